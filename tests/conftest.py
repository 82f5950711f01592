import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SGLANG_KVC_QUIET", "1")

import warnings

warnings.filterwarnings("ignore", message=".*not supported on current platform.*")
warnings.filterwarnings("ignore", message=".*support AWQ.*")
warnings.filterwarnings("ignore", message=".*support GGUF.*")
