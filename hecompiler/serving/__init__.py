"""Serving a compiled program over HTTP: ``hecompile serve`` (server) and :mod:`hecompiler.client`.

* :mod:`.wire` -- the HTTP API and the key-upload format (bundles carry the ciphertexts);
* :mod:`.app` -- the aiohttp front end: checks, limits, sessions, queue, timeouts;
* :mod:`.pool` -- where evaluation runs: local worker processes or a Dask cluster;
* :mod:`.engine` -- what a worker does: the program and key sets loaded once, protocol steps;
* :mod:`.store` -- key sets and sessions on disk (``--store``), so a restart loses nothing.

The server never receives a secret key: clients upload evaluation keys only (refused otherwise),
encrypt and decrypt themselves, and answer client-aided refreshes as request/response steps of
a session.  aiohttp is an optional dependency (``pip install 'hecompiler[serve]'``); the client
uses only the standard library.
"""
