//! sd_notify integration: READY, STATUS and watchdog pings.
