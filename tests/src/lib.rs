//! Test harness: starts real etcd and Meridian binaries on loopback addresses.
