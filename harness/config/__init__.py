"""Run configuration, plain data: one frozen description of a cell and seed (:mod:`.run_config`), and
which of its fields a group job's students may differ on (:mod:`.student_side`)."""

from harness.config.run_config import (
    FIELD_NAMES,
    DataConfig,
    ModelConfig,
    PretrainConfig,
    RunConfig,
    RuntimeConfig,
    TeacherConfig,
    check_field,
    describe_validation_error,
    flatten,
    format_value,
    load_config,
    load_yaml,
    parse_assignments,
    parse_config,
    parse_value,
    set_dotted,
)

__all__ = ["FIELD_NAMES", "DataConfig", "ModelConfig", "PretrainConfig", "RunConfig", "RuntimeConfig",
           "TeacherConfig", "check_field", "describe_validation_error", "flatten", "format_value", "load_config",
           "load_yaml", "parse_assignments", "parse_config", "parse_value", "set_dotted"]
