"""The one list of model kinds and what each is given (importable without torch)."""

MODEL_NEEDS = {"image": frozenset({"image"}), "text": frozenset({"text"}),
               "combined": frozenset({"image", "text"})}
MODEL_KINDS = tuple(MODEL_NEEDS)
