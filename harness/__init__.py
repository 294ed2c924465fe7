"""milan-bench: a benchmark-and-ablation harness around one MILAN implementation."""
