"""Search spaces for `mlot tune` (YAML files: job-config paths -> Ray Tune distributions)."""
