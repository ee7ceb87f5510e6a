"""The web console under /ui/: sign-in sessions, page shells and their static assets.

Pages are small server-rendered shells (Jinja2) whose scripts, served from this package,
read and change the node through the same admin and /v1 APIs the CLI and clients use,
forwarded with the signed-in principal's secret, which never reaches the browser.
"""
