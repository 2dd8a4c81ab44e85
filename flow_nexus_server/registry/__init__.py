"""The model registry: named models as semantic versions with immutable manifests, one canonical
evaluation, gated promotion to ``stable``, rollback, serving by ``registry:NAME@ref`` and fusion."""
