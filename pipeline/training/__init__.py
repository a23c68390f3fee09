"""The training job on Ray: stage configs, the corpus through Ray Data, the Ray Train workers, the
driver that runs tokenizer -> autoencoder -> CALM and/or AR, and the miniature paper table."""
