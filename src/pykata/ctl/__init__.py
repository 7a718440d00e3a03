"""kata-agent-ctl: call any agent API from the command line, scripted or interactive."""
