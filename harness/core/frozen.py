"""The one base of plain-data records: frozen pydantic models that refuse unknown fields."""

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    """Immutable, hashable where its fields are, and strict about its keys: a misspelt field in a
    YAML file is an error, not a silently ignored setting."""

    model_config = ConfigDict(frozen=True, extra="forbid")
