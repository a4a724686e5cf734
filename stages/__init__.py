"""Processing stages: each knows one model family, nothing of files on disk, HTTP or systemd."""
