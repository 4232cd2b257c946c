"""The process's own settings: the ``MOE_*`` environment variables, beside the config file.

``Settings.load()`` builds them, typed and checked, from one source order, highest first: values passed in, then
the environment. There is no ``.env`` file and no secrets folder: a deployment sets variables. ``moe`` builds
them once, as it starts, so a bad value stops every command with a message naming the variable; library code
that is handed none builds them from the same sources when it first needs one (nothing is read at import).

=================  =================  ========================================================  =====================
variable           setting            what it holds                                             default
=================  =================  ========================================================  =====================
MOE_CACHE_DIR      ``cache_dir``      what the project derives on this machine (embeddings,     ``~/.cache/moe-router``
                                      distilled tables)
MOE_DATA_DIR       ``data_dir``       the shared data sets ``moe eval``, ``convert`` and        ``../shared/data``
                                      ``demo`` read (their ``--data`` wins)                     from the working folder
MOE_FAISS_THREADS  ``faiss_threads``  OpenMP threads for the gate's nearest-example search      1
MOE_API_KEY        ``api_key``        the service's key for ``moe ask`` and ``moe route`` with  none
                                      ``--url`` (kept out of the process list); never shown
=================  =================  ========================================================  =====================

An empty variable, or one of blanks only, counts as unset. A leading ``~`` in a path is the home folder, as a
shell expands it (which it does not inside quotes, nor in a compose file or a Kubernetes manifest). The
variables a config names (``api_key_env``, ``security.*_env``, ``state.url_env``) and its ``${VAR}``
references are the config's own, read where the config is loaded or a client is built (``router.config``); they
are not settings of the process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = ["ENV_PREFIX", "Settings", "SettingsError"]

ENV_PREFIX = "MOE_"
_SECRET = frozenset({"api_key"})  # a bad value of these is named, never shown


class SettingsError(ValueError):
    """A ``MOE_*`` variable holds a value its setting cannot take; the message names each such variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True)

    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "moe-router")
    data_dir: Path | None = None
    # One thread measured faster than two for single queries on small machines (README, Performance).
    faiss_threads: int = Field(default=1, ge=1, le=1024)
    api_key: SecretStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, values: Any) -> Any:
        """A value of blanks only counts as unset, as an empty one does (``env_ignore_empty``)."""
        if isinstance(values, dict):
            return {k: v for k, v in values.items() if not (isinstance(v, str) and not v.strip())}
        return values

    @field_validator("cache_dir", "data_dir")
    @classmethod
    def _home(cls, path: Path | None) -> Path | None:
        return path.expanduser() if path is not None else None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings  # arguments first, then the environment; no .env, no secrets folder

    @classmethod
    def load(cls, **values: Any) -> Settings:
        """The settings from ``values`` and the environment; ``SettingsError`` names every bad variable."""
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                field = str(error["loc"][0]) if error["loc"] else "?"
                name = cls.env_name(field)
                shown = "" if field in _SECRET else f"={error.get('input')!r}"
                message = str(error["msg"])
                problems.append(f"{name}{shown}: {message[:1].lower()}{message[1:]}")
            raise SettingsError("; ".join(problems)) from None

    @staticmethod
    def env_name(field: str) -> str:
        """The variable that sets ``field`` (``cache_dir`` -> ``MOE_CACHE_DIR``)."""
        return f"{ENV_PREFIX}{field.upper()}"
