"""Quality benchmark (issue #7): a tiny Llama trained here, evaluated through the tiered pool and kernels.

``train_tiny_lm`` trains and saves the model; ``eval_quality`` measures perplexity, passkey
retrieval and per-layer attention error for each tier; ``report`` renders the results table/plot.
"""
