"""The papers' experiments: masked patch prediction (`mpp`), few-shot linear evaluation
(`fewshot`) and resumable study grids with tables and plots (`study`, built-ins in `presets`)."""
