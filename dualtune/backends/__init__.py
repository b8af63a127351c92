"""Framework backends: one subpackage per framework (``dualtune.backends.torch``,
``dualtune.backends.mindspore``), each exposing ``create(device) -> Backend``.
Import one only through ``dualtune.backend.get_backend``: importing activates a framework."""
