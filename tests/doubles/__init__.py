"""Test doubles: stand-ins for real services, used only by tests and named as such."""

from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer

__all__ = ["Behaviour", "ScriptedOpenAIServer"]
