"""The one base of plain-data records: frozen pydantic models that refuse unknown fields."""

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    """Immutable, hashable where its fields are, strict about its keys (a misspelt field in a YAML
    file is an error, not a silently ignored setting) and about its numbers (``inf`` and ``nan`` are
    refused where a float is expected: no learning rate, epoch count or margin is infinite)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
