"""Pure tensor math: quantizers, k-means, GPTQ, allocation. Nothing here knows of models or files."""
