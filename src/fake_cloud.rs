//! A fake Qubitro REST API, faithful to the documented endpoints, for tests and firmware work.
