"""systemd units and the sysusers.d file, shipped inside apilogd so `apilogd install-service` can render them."""
