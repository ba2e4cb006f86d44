"""Export: CSV downloads, feeds to folders and SFTP, and membership webhooks."""
