"""The `submit` CLI, config composition, executors and the training job."""
