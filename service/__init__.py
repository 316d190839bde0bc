"""The cltune service: REST API, job store, workers and inference around the library."""
