"""Export service pieces against real PostgreSQL, a real SFTP server and a real HTTP receiver."""
