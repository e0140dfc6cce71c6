"""Training moon3rt models (shipped as ``moon3rt.train``): losses, the RL stage, the loop."""
