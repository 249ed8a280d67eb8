//! Logging setup: structured journald records under systemd, readable lines on stderr elsewhere.
