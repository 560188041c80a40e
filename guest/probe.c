/*
 * probe: started by the guest's init, runs forever at high priority (SCHED_FIFO when allowed).
 *
 * (a) Gaps in CLOCK_MONOTONIC: a thread sleeps 5 ms in a loop; a sleep that took more than
 *     probe.gap_ms (default 50) beyond its 5 ms prints
 *         PROBE gap ms=<elapsed ms of that sleep, 1 decimal>
 * (b) vCPU stops. QEMU stops the guest's clocks while the VM is stopped, so CLOCK_MONOTONIC cannot
 *     see a stop; the emulated RTC follows host time. At each RTC second (update interrupts through
 *     /dev/rtc0, RTC_UIE_ON; else polling RTC_RD_TIME every 2 ms) the offset
 *         off = rtc_seconds * 1000 - monotonic_ms
 *     is taken. Its true value T is constant while the VM runs and a stop of D ms raises it by D. A
 *     tick is never seen early, only late: off = T - latency. The latency is a millisecond or two,
 *     but up to hundreds of ms when the host does not run the vCPU thread (a loaded host), and a stop
 *     that spans a second boundary delivers the pending tick at resume, reading the RTC's whole
 *     second: that tick is "late" by the fraction of the second the stop ran into.
 *     Hence, robust to late ticks:
 *       - idle: ref = the highest off of the last 30 idle ticks, leaving out the latest one (so that a
 *         stop whose first tick showed less than probe.stop_ms is counted whole). A tick with
 *         off - ref > probe.stop_ms (default 15) starts an event; others join the idle ticks.
 *       - event: level = the highest off seen since it began. The event ends at the first tick whose
 *         off is within probe.stop_ms of the level seen before it (two ticks agree on the new
 *         offset), or after 10 ticks, and prints
 *           PROBE stop ms=<level - ref, 1 decimal> rtc=<RTC epoch s of the tick that began the event>
 *     A late tick (off far below the others) thus neither starts an event nor ends one.
 *     Every tick prints a heartbeat:
 *         PROBE tick rtc=<RTC epoch s> off=<off minus the first tick's off, ms, 1 decimal>
 *     At start:
 *         PROBE start mode=uie|poll       (poll: RTC_UIE_ON failed, or probe.poll=1 on the cmdline)
 *     Errors: PROBE error <what>: <strerror>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/rtc.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "cmdline-param.h"

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
  char buf[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n > sizeof buf - 2) n = (int)(sizeof buf - 2);
  buf[n++] = '\n';
  for (;;) {
    ssize_t w = write(STDOUT_FILENO, buf, (size_t)n);
    if (w < 0 && errno == EINTR) continue;
    break;
  }
}

static double mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static void sleep_ns(long ns) {
  struct timespec ts = {ns / 1000000000L, ns % 1000000000L};
  while (clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, &ts) == EINTR) {
  }
}


static double gap_ms = 50, stop_ms = 15;

static void *gap_thread(void *arg) {
  (void)arg;
  for (;;) {
    double t0 = mono_ms();
    sleep_ns(5000000L);
    double el = mono_ms() - t0;
    if (el - 5.0 > gap_ms) say("PROBE gap ms=%.1f", el);
  }
  return NULL;
}

/* RTC time as epoch seconds (the RTC keeps UTC), or -1. */
static long long rtc_seconds(int fd) {
  struct rtc_time rt;
  if (ioctl(fd, RTC_RD_TIME, &rt) != 0) return -1;
  struct tm tm;
  memset(&tm, 0, sizeof tm);
  tm.tm_sec = rt.tm_sec;
  tm.tm_min = rt.tm_min;
  tm.tm_hour = rt.tm_hour;
  tm.tm_mday = rt.tm_mday;
  tm.tm_mon = rt.tm_mon;
  tm.tm_year = rt.tm_year;
  return (long long)timegm(&tm);
}

static void write_pidfile(void) {
  char buf[32];
  int n = snprintf(buf, sizeof buf, "%ld\n", (long)getpid());
  int fd = open("/run/probe.pid", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  if (write(fd, buf, (size_t)n) < 0) {
    /* best effort */
  }
  close(fd);
}

int main(void) {
  gap_ms = cmdline_param("probe.gap_ms", 50);
  stop_ms = cmdline_param("probe.stop_ms", 15);

  struct sched_param sp = {.sched_priority = 50};
  if (sched_setscheduler(0, SCHED_FIFO, &sp) != 0) say("PROBE error sched_setscheduler SCHED_FIFO: %s", strerror(errno));
  if (mlockall(MCL_CURRENT | MCL_FUTURE) != 0) say("PROBE error mlockall: %s", strerror(errno));

  int fd;
  for (int reported = 0;; reported = 1) {
    fd = open("/dev/rtc0", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) break;
    if (!reported) say("PROBE error open /dev/rtc0: %s", strerror(errno));
    sleep_ns(1000000000L);
  }
  /* probe.poll=1 on the kernel command line forces the polling mode (to test it). */
  int uie = cmdline_param("probe.poll", 0) == 0 && ioctl(fd, RTC_UIE_ON, 0) == 0;
  say("PROBE start mode=%s", uie ? "uie" : "poll");
  write_pidfile();

  pthread_t th;
  int e = pthread_create(&th, NULL, gap_thread, NULL);
  if (e != 0) say("PROBE error pthread_create: %s", strerror(e));

  /* A long window: a false stop needs every tick of it read late (a loaded host), and the true
   * offset never falls, so an old high mark is still right. */
  enum { WINDOW = 30, EVENT_MAX_TICKS = 10 };
  double idle_off[WINDOW]; /* offsets of the last idle ticks, oldest first */
  int idle_n = 0;
  int have_first = 0, in_event = 0, event_ticks = 0;
  double first_off = 0, ref = 0, level = 0;
  long long event_rtc = 0, last_s = -1;
  for (;;) {
    double m;
    long long s;
    if (uie) {
      unsigned long data;
      ssize_t r = read(fd, &data, sizeof data);
      if (r != (ssize_t)sizeof data) {
        if (r < 0 && errno == EINTR) continue;
        say("PROBE error read /dev/rtc0: %s", r < 0 ? strerror(errno) : "short read");
        sleep_ns(100000000L);
        continue;
      }
      /* The RTC first, then the clock: a tick can then only look late, never early (off <= T). */
      s = rtc_seconds(fd);
      m = mono_ms();
    } else {
      sleep_ns(2000000L);
      s = rtc_seconds(fd);
      m = mono_ms();
      if (s >= 0 && last_s < 0) {
        last_s = s; /* the first change of seconds is the first tick */
        continue;
      }
      if (s == last_s) continue;
    }
    if (s < 0) {
      say("PROBE error ioctl RTC_RD_TIME: %s", strerror(errno));
      sleep_ns(100000000L);
      continue;
    }
    last_s = s;
    double off = (double)s * 1000.0 - m;
    if (!have_first) {
      have_first = 1;
      first_off = off;
    }
    if (!in_event) {
      /* ref: the highest idle offset but the latest (or the only one). */
      int n = idle_n > 1 ? idle_n - 1 : idle_n;
      if (n > 0) {
        ref = idle_off[0];
        for (int i = 1; i < n; i++)
          if (idle_off[i] > ref) ref = idle_off[i];
      }
      if (n > 0 && off - ref > stop_ms) {
        in_event = 1;
        event_ticks = 1;
        level = off;
        event_rtc = s;
      } else {
        if (idle_n == WINDOW) {
          memmove(idle_off, idle_off + 1, sizeof idle_off[0] * (WINDOW - 1));
          idle_n--;
        }
        idle_off[idle_n++] = off;
      }
    } else {
      event_ticks++;
      int agrees = fabs(off - level) < stop_ms;
      if (off > level) level = off;
      if (agrees || event_ticks >= EVENT_MAX_TICKS) {
        say("PROBE stop ms=%.1f rtc=%lld", level - ref, event_rtc);
        in_event = 0;
        idle_n = 0;
        idle_off[idle_n++] = level;
      }
    }
    say("PROBE tick rtc=%lld off=%.1f", s, off - first_off);
  }
}
