"""What an engine replica streams to the ingress for one request, in order.

`Started` (the request is admitted and its first chunk checked: the response's headers may
leave), then `Audio` pieces (stretched and marked), then `Ended`; or `Failed` at any point, an
`APIError` to answer with (before `Started`, it is the response's status).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from csm.server.errors import APIError


@dataclass(frozen=True)
class Started:
    replica: str  # Ray Serve's unique id of the replica that runs the request


@dataclass(frozen=True)
class Audio:
    samples: torch.Tensor
    generated: int  # samples the model made so far (before speed)


@dataclass(frozen=True)
class Ended:
    generated: int
    truncated: bool
    input_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, error: APIError) -> Failed:
        return cls(error.status, error.message, error.param, error.code, dict(error.headers))

    def error(self) -> APIError:
        return APIError(self.status, self.message, param=self.param, code=self.code, headers=dict(self.headers))
