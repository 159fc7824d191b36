"""Executors of HE programs, behind one interface (installed as ``hecompiler.backends``).

Every backend runs programs on the shared executor (:mod:`hecompiler.executor`) with its own
primitives; the encrypted ones also share the client/server protocol (:mod:`.protocol`).

=========  =============================================  ============================
name       what runs                                      refresh
=========  =============================================  ============================
sim        numpy slot vectors (:mod:`.sim`)               simulated
seal       Microsoft SEAL through tenseal (:mod:`.seal`)  client-aided re-encryption
lattigo    Lattigo through our cgo library                bootstrapping (non-interactive)
           (:mod:`.lattigo.session`)
=========  =============================================  ============================

An encrypted backend module offers, for a program ``prog`` and its ``.hec`` metadata ``meta``:
``client_keygen(prog, client_dir, server_dir, meta=None)``, ``open_client(prog, keys_dir,
meta=None)`` and ``open_server(prog, keys_dir, meta=None)`` (the protocol's two sides, keys
loaded once), and ``run_encrypted(prog, inputs, progress=None, meta=None)`` (keygen, encrypt,
evaluate, decrypt in one process).  :func:`get` returns the module; :func:`for_program` names
the backend a compiled program was planned for.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from hecompiler.errors import HecError

BACKENDS = {"sim": "hecompiler.backends.sim", "seal": "hecompiler.backends.seal",
            "lattigo": "hecompiler.backends.lattigo.session"}
ENCRYPTED = ("seal", "lattigo")


def get(name: str):
    """The backend module ``name`` (one of :data:`BACKENDS`)."""
    if name not in BACKENDS:
        raise HecError(f"unknown backend {name!r}; backends: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def for_program(meta: Mapping[str, Any] | None) -> str:
    """The encrypted backend a program was compiled for (its target; SEAL for older programs)."""
    target = (meta or {}).get("target") or {}
    return str(target.get("backend", "seal"))
