"""cosmos: COSMOS vision-language models in plain PyTorch."""
