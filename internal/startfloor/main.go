// Command startfloor does nothing: built like volagent (static, no cgo),
// it is what `make bench` measures as the floor under volagent's
// per-process figures, the start and exit of a Go program on this host.
package main

func main() {}
