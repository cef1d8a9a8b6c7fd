"""What `--model` names: the catalogue of aliases, the models shipped as pip packages, and
resolution to a local file or directory through the Hugging Face hub client."""
