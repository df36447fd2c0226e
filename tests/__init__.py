"""The test suite is a regular package so that `tests.exporters.conftest` and `tests.tiny_models`
resolve here even when another distribution installs a top-level `tests` package (a regular
package anywhere on sys.path shadows a namespace package)."""
