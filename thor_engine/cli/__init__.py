"""Command-line helpers shared by `python -m thor_engine` and `python -m server` (`make serve`).

Owns: what depends on running from a checkout rather than on the library itself, such
as starting the repository's own sandbox service for a local run (`local_sandbox`).
Does not own: the decoder or the server; the `thor_engine` library never imports this
package.
"""
