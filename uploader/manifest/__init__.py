"""The SQL manifest; :class:`uploader.manifest.repo.Manifest` is its front (see there)."""
