"""For snq's tests: a plugin whose module does not import."""

import snq_example_missing_dependency  # noqa: F401


class Broken:
    pass
