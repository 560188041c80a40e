/*
 * writer: started by the guest's init, runs forever.
 *
 * Appends 64-byte checksummed records to /var/lib/writer/rec-NNNNNN.log (1024 records a file) on the
 * ext4 root, each with ONE write() (O_APPEND) followed by fsync(), continuing the sequence across
 * reboots. The host checks the files of a disk image (snapshot, crash copy) for continuity.
 *
 * Record (little-endian):
 *   0  u32 magic 0x43455257 ("WREC")
 *   4  u32 boot         1 at the first start ever, +1 at every start
 *   8  u64 seq          1, 2, 3, ... never a hole, across files and boots
 *   16 u64 mono_ns      CLOCK_MONOTONIC
 *   24 u64 realtime_ns  CLOCK_REALTIME
 *   32 u8[28] payload   payload[i] = (seq * 31 + i) & 0xff
 *   60 u32 crc          zlib CRC-32 of bytes 0..59
 * File k (1-based) holds seqs (k-1)*1024+1 .. k*1024.
 *
 * Console lines (stdout, one write() each):
 *   WRITER start boot=<b> seq=<next seq> files=<rec files found at start>
 *   WRITER seq=<last fsynced seq> n=<records fsynced since the previous line> max_us=<max write+fsync us>
 *       (once per second of guest CLOCK_MONOTONIC time, from a separate thread: printed while a write
 *       is blocked too, e.g. on a frozen filesystem: then n=0)
 *   WRITER slow seq=<seq> us=<write+fsync latency>      (one record took longer than writer.slow_ms)
 *   WRITER error invalid tail in <file> at offset <N>: truncating
 *   WRITER error <what>: <strerror>                    (then retried after 100 ms; never exits)
 *
 * Parameters from /proc/cmdline: writer.interval_ms (default 10), writer.slow_ms (default 50).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "cmdline-param.h"

#ifndef DIR_PATH
#define DIR_PATH "/var/lib/writer"
#endif
#define REC_SIZE 64
#define RECS_PER_FILE 1024
#define MAGIC 0x43455257u
#define PAYLOAD_OFF 32
#define PAYLOAD_LEN 28
#define CRC_OFF 60

static uint32_t crc_table[256];

static void crc_init(void) {
  for (uint32_t n = 0; n < 256; n++) {
    uint32_t c = n;
    for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    crc_table[n] = c;
  }
}

/* The standard (zlib) CRC-32. */
static uint32_t crc32_buf(const uint8_t *p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; i++) c = crc_table[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

static void put_u32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put_u64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get_u32(const uint8_t *p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}
static uint64_t get_u64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

/* One console line, one write(). */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
  char buf[4096];
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

static uint64_t now_ns(clockid_t clk) {
  struct timespec ts;
  clock_gettime(clk, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(long ms) {
  if (ms <= 0) return;
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  while (clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, &ts) == EINTR) {
  }
}


static void file_path(char *out, size_t size, unsigned idx) {
  snprintf(out, size, "%s/rec-%06u.log", DIR_PATH, idx);
}

/* Sleeps 100 ms after an error. */
static void error_pause(void) { sleep_ms(100); }

static void fsync_dir(void) {
  for (;;) {
    int d = open(DIR_PATH, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (d >= 0) {
      int r = fsync(d);
      int e = errno;
      close(d);
      if (r == 0) return;
      say("WRITER error fsync %s: %s", DIR_PATH, strerror(e));
    } else {
      say("WRITER error open %s: %s", DIR_PATH, strerror(errno));
    }
    error_pause();
  }
}

static void make_dirs(void) {
  const char *dirs[] = {"/var", "/var/lib", DIR_PATH};
  for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
    while (mkdir(dirs[i], 0755) != 0 && errno != EEXIST) {
      say("WRITER error mkdir %s: %s", dirs[i], strerror(errno));
      error_pause();
    }
  }
}

/* Number of rec-NNNNNN.log files and the highest index (0 if none). */
static void scan_dir(unsigned *count, unsigned *max_idx) {
  for (;;) {
    DIR *d = opendir(DIR_PATH);
    if (!d) {
      say("WRITER error opendir %s: %s", DIR_PATH, strerror(errno));
      error_pause();
      continue;
    }
    *count = 0;
    *max_idx = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
      const char *n = e->d_name;
      if (strlen(n) != 14 || strncmp(n, "rec-", 4) != 0 || strcmp(n + 10, ".log") != 0) continue;
      unsigned idx = 0;
      int ok = 1;
      for (int i = 4; i < 10; i++) {
        if (n[i] < '0' || n[i] > '9') ok = 0;
        else idx = idx * 10 + (unsigned)(n[i] - '0');
      }
      if (!ok || idx == 0) continue;
      (*count)++;
      if (idx > *max_idx) *max_idx = idx;
    }
    closedir(d);
    return;
  }
}

static int record_valid(const uint8_t *r, uint64_t want_seq) {
  return get_u32(r) == MAGIC && get_u64(r + 8) == want_seq && get_u32(r + CRC_OFF) == crc32_buf(r, CRC_OFF);
}

/* Opens file idx (creating it), reads it, finds the valid prefix; truncates an invalid tail.
 * Returns the fd (O_RDWR|O_APPEND), sets *valid (records) and *last_boot (0 if none valid). */
static int open_and_check(unsigned idx, unsigned *valid, uint32_t *last_boot) {
  char path[256];
  file_path(path, sizeof path, idx);
  for (;;) {
    int fd = open(path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
      say("WRITER error open %s: %s", path, strerror(errno));
      error_pause();
      continue;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
      say("WRITER error fstat %s: %s", path, strerror(errno));
      close(fd);
      error_pause();
      continue;
    }
    size_t size = (size_t)st.st_size;
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) {
      say("WRITER error malloc %zu: %s", size, strerror(errno));
      close(fd);
      error_pause();
      continue;
    }
    size_t got = 0;
    int err = 0;
    while (got < size) {
      ssize_t r = pread(fd, buf + got, size - got, (off_t)got);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        err = errno;
        break;
      }
      if (r == 0) break;
      got += (size_t)r;
    }
    if (err) {
      say("WRITER error read %s: %s", path, strerror(err));
      free(buf);
      close(fd);
      error_pause();
      continue;
    }
    size = got;
    uint64_t first_seq = (uint64_t)(idx - 1) * RECS_PER_FILE + 1;
    unsigned n = 0;
    uint32_t boot = 0;
    while (n < RECS_PER_FILE && (size_t)(n + 1) * REC_SIZE <= size &&
           record_valid(buf + (size_t)n * REC_SIZE, first_seq + n)) {
      boot = get_u32(buf + (size_t)n * REC_SIZE + 4);
      n++;
    }
    free(buf);
    if ((size_t)n * REC_SIZE != (size_t)st.st_size) {
      off_t off = (off_t)n * REC_SIZE;
      say("WRITER error invalid tail in %s at offset %lld: truncating", path, (long long)off);
      while (ftruncate(fd, off) != 0 || fsync(fd) != 0) {
        say("WRITER error truncate %s: %s", path, strerror(errno));
        error_pause();
      }
    }
    *valid = n;
    *last_boot = boot;
    return fd;
  }
}

/*
 * Write+fsync latencies since the last report, as a histogram with 16 buckets per octave: bucket i
 * holds latencies of 2^(i/16) us up to 2^((i+1)/16) us (bucket 0 also 0 us), so percentiles of any
 * window can be read from the per-second lines to within 4.4%.
 */
#define HIST_PER_OCTAVE 16
#define HIST_BUCKETS (28 * HIST_PER_OCTAVE) /* up to 2^28 us: 268 s */

static double bucket_floor(unsigned b) { return pow(2.0, (double)b / HIST_PER_OCTAVE); }

static unsigned hist_bucket(uint64_t us) {
  if (us < 1) return 0;
  double guess = floor(log2((double)us) * HIST_PER_OCTAVE);
  unsigned b = guess < 0 ? 0 : guess >= HIST_BUCKETS ? HIST_BUCKETS - 1 : (unsigned)guess;
  /* log2's rounding may put a latency at a bucket's edge one off: settle it on the edges themselves. */
  while (b > 0 && (double)us < bucket_floor(b)) b--;
  while (b + 1 < HIST_BUCKETS && (double)us >= bucket_floor(b + 1)) b++;
  return b;
}

static struct {
  pthread_mutex_t m;
  uint64_t last_seq; /* last fsynced seq */
  uint64_t n;        /* fsynced since the last report */
  uint64_t max_us;   /* max write+fsync latency since the last report */
  uint32_t hist[HIST_BUCKETS];
} stats = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, {0}};

static void *reporter(void *arg) {
  (void)arg;
  struct timespec next;
  clock_gettime(CLOCK_MONOTONIC, &next);
  for (;;) {
    next.tv_sec += 1;
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) {
    }
    uint32_t hist[HIST_BUCKETS];
    pthread_mutex_lock(&stats.m);
    uint64_t seq = stats.last_seq, n = stats.n, max_us = stats.max_us;
    memcpy(hist, stats.hist, sizeof hist);
    memset(stats.hist, 0, sizeof stats.hist);
    stats.n = 0;
    stats.max_us = 0;
    pthread_mutex_unlock(&stats.m);
    /* The non-empty buckets as bucket:count pairs. */
    char hs[HIST_BUCKETS * 16];
    size_t len = 0;
    hs[0] = '\0';
    for (unsigned i = 0; i < HIST_BUCKETS && len < sizeof hs - 32; i++) {
      if (hist[i] == 0) continue;
      len += (size_t)snprintf(hs + len, sizeof hs - len, "%s%u:%" PRIu32, len == 0 ? "" : ",", i, hist[i]);
    }
    say("WRITER seq=%" PRIu64 " n=%" PRIu64 " max_us=%" PRIu64 " hist=%s", seq, n, max_us, hs);
    /* Fell behind (the vCPU was starved): report once per second from now on, no burst. */
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (now.tv_sec > next.tv_sec + 1) next = now;
  }
  return NULL;
}

static void write_pidfile(void) {
  char buf[32];
  int n = snprintf(buf, sizeof buf, "%ld\n", (long)getpid());
  int fd = open("/run/writer.pid", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  if (write(fd, buf, (size_t)n) < 0) {
    /* best effort */
  }
  close(fd);
}

int main(void) {
  crc_init();
  long interval_ms = (long)cmdline_param("writer.interval_ms", 10);
  long slow_ms = (long)cmdline_param("writer.slow_ms", 50);

  make_dirs();
  unsigned files, idx;
  scan_dir(&files, &idx);

  int fd;
  unsigned in_file = 0;
  uint32_t last_boot = 0;
  if (idx == 0) {
    idx = 1;
    fd = open_and_check(idx, &in_file, &last_boot);
    fsync_dir();
  } else {
    for (;;) {
      fd = open_and_check(idx, &in_file, &last_boot);
      if (in_file > 0 || idx == 1) break;
      /* Empty last file: the previous one must be full, else this file is a stray: remove it. */
      unsigned prev_valid;
      uint32_t prev_boot;
      int pfd = open_and_check(idx - 1, &prev_valid, &prev_boot);
      close(pfd);
      if (prev_valid == RECS_PER_FILE) {
        last_boot = prev_boot;
        break;
      }
      char path[256];
      file_path(path, sizeof path, idx);
      close(fd);
      say("WRITER error invalid tail in %s at offset 0: truncating", path);
      while (unlink(path) != 0 && errno != ENOENT) {
        say("WRITER error unlink %s: %s", path, strerror(errno));
        error_pause();
      }
      fsync_dir();
      idx--;
    }
  }

  uint32_t boot = last_boot + 1;
  uint64_t seq = (uint64_t)(idx - 1) * RECS_PER_FILE + in_file + 1;
  stats.last_seq = seq - 1;
  say("WRITER start boot=%" PRIu32 " seq=%" PRIu64 " files=%u", boot, seq, files);
  write_pidfile();

  pthread_t th;
  int e = pthread_create(&th, NULL, reporter, NULL);
  if (e != 0) say("WRITER error pthread_create: %s", strerror(e));

  char path[256];
  file_path(path, sizeof path, idx);
  int need_truncate = 0;
  for (;;) {
    if (in_file == RECS_PER_FILE) {
      unsigned next = idx + 1;
      char npath[256];
      file_path(npath, sizeof npath, next);
      int nfd = open(npath, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
      if (nfd < 0) {
        say("WRITER error open %s: %s", npath, strerror(errno));
        error_pause();
        continue;
      }
      close(fd);
      fd = nfd;
      idx = next;
      in_file = 0;
      memcpy(path, npath, sizeof path);
      fsync_dir();
    }
    off_t good = (off_t)in_file * REC_SIZE;
    if (need_truncate) {
      if (ftruncate(fd, good) != 0) {
        say("WRITER error truncate %s: %s", path, strerror(errno));
        error_pause();
        continue;
      }
      need_truncate = 0;
    }

    uint8_t rec[REC_SIZE];
    put_u32(rec, MAGIC);
    put_u32(rec + 4, boot);
    put_u64(rec + 8, seq);
    put_u64(rec + 16, now_ns(CLOCK_MONOTONIC));
    put_u64(rec + 24, now_ns(CLOCK_REALTIME));
    for (int i = 0; i < PAYLOAD_LEN; i++) rec[PAYLOAD_OFF + i] = (uint8_t)((seq * 31 + (uint64_t)i) & 0xff);
    put_u32(rec + CRC_OFF, crc32_buf(rec, CRC_OFF));

    uint64_t t0 = now_ns(CLOCK_MONOTONIC);
    ssize_t w = write(fd, rec, REC_SIZE);
    if (w != REC_SIZE) {
      if (w < 0) say("WRITER error write %s: %s", path, strerror(errno));
      else say("WRITER error write %s: short write (%zd bytes)", path, w);
      need_truncate = 1;
      error_pause();
      continue;
    }
    if (fsync(fd) != 0) {
      say("WRITER error fsync %s: %s", path, strerror(errno));
      need_truncate = 1; /* the record's fate is unknown: write it again */
      error_pause();
      continue;
    }
    uint64_t us = (now_ns(CLOCK_MONOTONIC) - t0) / 1000;
    pthread_mutex_lock(&stats.m);
    stats.last_seq = seq;
    stats.n++;
    if (us > stats.max_us) stats.max_us = us;
    stats.hist[hist_bucket(us)]++;
    pthread_mutex_unlock(&stats.m);
    if (us > (uint64_t)slow_ms * 1000) say("WRITER slow seq=%" PRIu64 " us=%" PRIu64, seq, us);
    seq++;
    in_file++;
    sleep_ms(interval_ms);
  }
}
