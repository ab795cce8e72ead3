"""Federated continual learning (issue 19, FLoRA arXiv 2404.15182): any scenario's experiences
trained by K clients that share only what the strategy communicates (docs/federation.md)."""
