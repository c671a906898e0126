"""Private set intersection of sample ids (ECDH PSI, openmined-psi), as pure functions on bytes.

In a vertical job the label holder (the top) is the PSI *client*: it learns which of its ids
each party also holds, and nothing else; each party is a PSI *server*: it learns only the
size of the top's set, and then the final intersection the top sends it. What crosses the
broker is blinded elliptic-curve points, never an id outside the intersection.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

#: False-positive rate of the server's set encoding (an id taken for shared by mistake).
FPR = 1e-9


def _psi() -> Any:
    try:
        import private_set_intersection.python as psi
    except ImportError as exc:  # an optional dependency: only vertical jobs with align = "psi" need it
        raise ValueError("align = 'psi' needs the openmined-psi package: pip install 'splitmq[vertical]'") from exc
    return psi


def to_tensor(data: bytes) -> torch.Tensor:
    """Opaque bytes as a uint8 tensor (how they travel on the wire)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def to_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().numpy().tobytes())


def _items(ids: Sequence[int] | torch.Tensor) -> list[str]:
    return [str(int(i)) for i in ids]


class Seeker:
    """The label holder's side: one request over its ids, then the intersection with each party."""

    def __init__(self, ids: torch.Tensor) -> None:
        psi = _psi()
        self.ids = ids
        self._client = psi.client.CreateWithNewKey(True)
        self.request = bytes(self._client.CreateRequest(_items(ids)).SerializeToString())

    def shared_with(self, setup: bytes, response: bytes) -> torch.Tensor:
        """Our ids the party also holds (sorted).

        Raises:
            ValueError: messages that do not parse as a PSI setup and response.
        """
        psi = _psi()
        parsed_setup, parsed_response = psi.ServerSetup(), psi.Response()
        try:
            parsed_setup.ParseFromString(setup)
            parsed_response.ParseFromString(response)
            positions = self._client.GetIntersection(parsed_setup, parsed_response)
        except Exception as exc:  # the library raises several types for malformed input
            raise ValueError(f"not a PSI answer: {exc}") from None
        return torch.sort(self.ids[torch.tensor(sorted(positions), dtype=torch.int64)]).values


def answer(ids: torch.Tensor, request: bytes, client_count: int) -> tuple[bytes, bytes]:
    """A party's side: the setup over its own ids and the answer to the label holder's request.

    Raises:
        ValueError: a request that does not parse.
    """
    psi = _psi()
    server = psi.server.CreateWithNewKey(True)
    parsed = psi.Request()
    try:
        parsed.ParseFromString(request)
        setup = server.CreateSetupMessage(FPR, max(1, client_count), _items(ids), psi.DataStructure.RAW)
        response = server.ProcessRequest(parsed)
    except Exception as exc:
        raise ValueError(f"not a PSI request: {exc}") from None
    return bytes(setup.SerializeToString()), bytes(response.SerializeToString())
