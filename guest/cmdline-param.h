/*
 * cmdline_param: `name=<non-negative number>` from the kernel command line (/proc/cmdline), else
 * `def`. Shared by the guest's programs (included, not linked: each is one static binary).
 */
#ifndef GUEST_CMDLINE_PARAM_H
#define GUEST_CMDLINE_PARAM_H

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static double cmdline_param(const char *name, double def) {
  char buf[4096];
  int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return def;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return def;
  buf[n] = '\0';
  size_t len = strlen(name);
  char *save = NULL;
  for (char *tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
    if (strncmp(tok, name, len) == 0 && tok[len] == '=') {
      char *end;
      errno = 0;
      double v = strtod(tok + len + 1, &end);
      if (errno == 0 && end != tok + len + 1 && *end == '\0' && v >= 0) return v;
      return def;
    }
  }
  return def;
}

#endif
