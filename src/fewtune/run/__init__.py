"""One experiment: resolve → sample → select → build → train → evaluate → write, with its identity,
feasibility checks and resource accounting."""
