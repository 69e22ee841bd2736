// Package version is the one place volagent's version is written: the
// binary's --version, the D-Bus Version property and the packages read it.
package version

// Version of volagent (semantic versioning). scripts/version.sh reads it
// for the packages, so keep it a plain string constant on one line.
const Version = "0.1.0"
