"""Tooling for developing imagen: the benchmark, throwaway servers, the process runner, `imagen demo`.

The runtime (listener, actors, stages, operator commands) never imports this
package; only the `imagen bench` and `imagen demo` commands and the tests do.
Its modules share public names only.
"""
