"""A factory for the CLI tests: ``cli_factory:tiny_mixtral`` returns (model, example kwargs)."""

from hf_models import make_inputs, make_model


def tiny_mixtral():
    return make_model("mixtral"), make_inputs("mixtral", 2, 8)
