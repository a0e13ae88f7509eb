//! An OTLP/gRPC trace receiver for tests: collects the spans the binaries export.
