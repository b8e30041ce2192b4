"""An error that carries a machine-readable code (an RPC error code) beside its message."""

from __future__ import annotations


class CodedError(Exception):
    """`code` is for programs (it travels as an RPC Fail code), the message is for the operator."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message
