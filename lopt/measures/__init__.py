"""What a run is judged by: the task score, retention of the original model, and the loss plot."""
