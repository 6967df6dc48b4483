/*
 * authload: a load generator for cmuxd's TCP relay handshake (spec section 7), lean enough
 * that the daemon rather than the client is what a benchmark measures.
 *
 *   authload HOST PORT SECONDS CONCURRENCY   < credentials
 *   authload --selftest
 *
 * stdin holds the relay id on its first line and the hex token on its second, so the token
 * never appears on argv. CONCURRENCY non-blocking connections stay in flight (epoll); each
 * runs the mutual handshake (challenge, client MAC, reply with relay_mac checked) and is
 * closed, counted and replaced until SECONDS have passed; those in flight then finish. Any
 * refusal, mismatch or early close counts as an error. The last line on stdout is
 *   {"connections":N,"errors":E,"seconds":S,"cpu":C}
 * where cpu is this process's user+sys CPU seconds.
 *
 * Only libc: SHA-256 and HMAC-SHA256 are written out here (--selftest checks them).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------- */
/* SHA-256 (FIPS 180-4) */

typedef struct {
    uint32_t h[8];
    uint64_t total;
    uint8_t block[64];
    size_t used;
} sha256_ctx;

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2,
};

static uint32_t ror(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha256_compress(uint32_t h[8], const uint8_t *p)
{
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = hh + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

static void sha256_init(sha256_ctx *c)
{
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(c->h, iv, sizeof iv);
    c->total = 0;
    c->used = 0;
}

static void sha256_update(sha256_ctx *c, const void *data, size_t len)
{
    const uint8_t *p = data;
    c->total += len;
    if (c->used) {
        size_t take = 64 - c->used < len ? 64 - c->used : len;
        memcpy(c->block + c->used, p, take);
        c->used += take; p += take; len -= take;
        if (c->used < 64)
            return;
        sha256_compress(c->h, c->block);
        c->used = 0;
    }
    for (; len >= 64; p += 64, len -= 64)
        sha256_compress(c->h, p);
    memcpy(c->block, p, len);
    c->used = len;
}

static void sha256_final(sha256_ctx *c, uint8_t out[32])
{
    uint64_t bits = c->total * 8;
    c->block[c->used++] = 0x80;
    if (c->used > 56) {
        memset(c->block + c->used, 0, 64 - c->used);
        sha256_compress(c->h, c->block);
        c->used = 0;
    }
    memset(c->block + c->used, 0, 56 - c->used);
    for (int i = 0; i < 8; i++)
        c->block[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_compress(c->h, c->block);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(c->h[i] >> 24); out[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(c->h[i] >> 8); out[4 * i + 3] = (uint8_t)c->h[i];
    }
}

/* ------------------------------------------------------------------------------------- */
/* HMAC-SHA256 (RFC 2104), with the key's inner and outer pads hashed once up front */

typedef struct { sha256_ctx inner, outer; } hmac_key;

static void hmac_setkey(hmac_key *k, const uint8_t *key, size_t len)
{
    uint8_t block[64] = {0}, pad[64];
    if (len > 64) {
        sha256_ctx c;
        sha256_init(&c);
        sha256_update(&c, key, len);
        sha256_final(&c, block);
    } else {
        memcpy(block, key, len);
    }
    for (int i = 0; i < 64; i++) pad[i] = block[i] ^ 0x36;
    sha256_init(&k->inner);
    sha256_update(&k->inner, pad, 64);
    for (int i = 0; i < 64; i++) pad[i] = block[i] ^ 0x5c;
    sha256_init(&k->outer);
    sha256_update(&k->outer, pad, 64);
}

static void hmac(const hmac_key *k, const void *msg, size_t len, uint8_t out[32])
{
    sha256_ctx c = k->inner;
    uint8_t digest[32];
    sha256_update(&c, msg, len);
    sha256_final(&c, digest);
    c = k->outer;
    sha256_update(&c, digest, 32);
    sha256_final(&c, out);
}

static void to_hex(const uint8_t *in, size_t len, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < len; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * len] = 0;
}

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Decodes `hex` into `out` (room for len/2 bytes); -1 unless it is hex of even length. */
static long from_hex(const char *hex, size_t len, uint8_t *out)
{
    if (len % 2)
        return -1;
    for (size_t i = 0; i < len; i += 2) {
        int hi = hexval((unsigned char)hex[i]), lo = hexval((unsigned char)hex[i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[i / 2] = (uint8_t)(hi << 4 | lo);
    }
    return (long)(len / 2);
}

/* ------------------------------------------------------------------------------------- */
/* the handshake's messages (spec 7.3) */

#define MAX_NONCE 256  /* longest server nonce accepted; the daemon sends 32 characters */

static const char *relay_id;
static size_t relay_id_len;
static hmac_key key;

static void client_mac_hex(const char *snonce, size_t snlen, char out[65])
{
    char msg[64 + 512 + MAX_NONCE];
    int n = snprintf(msg, sizeof msg, "relay_id=%s\nnonce=%.*s\nversion=1", relay_id,
                     (int)snlen, snonce);
    uint8_t mac[32];
    hmac(&key, msg, (size_t)n, mac);
    to_hex(mac, 32, out);
}

static void relay_mac_hex(const char *cnonce, const char *snonce, size_t snlen, char out[65])
{
    char msg[128 + 512 + 128 + MAX_NONCE];
    int n = snprintf(msg, sizeof msg,
                     "cmux-relay-server-proof\nrelay_id=%s\nclient_nonce=%s\nserver_nonce=%.*s"
                     "\nversion=1", relay_id, cnonce, (int)snlen, snonce);
    uint8_t mac[32];
    hmac(&key, msg, (size_t)n, mac);
    to_hex(mac, 32, out);
}

/* ------------------------------------------------------------------------------------- */
/* just enough JSON: the daemon's lines are flat objects of strings, numbers and booleans */

typedef struct {
    const char *key; size_t key_len;   /* raw, between the quotes */
    const char *val; size_t val_len;   /* raw: a string's text between its quotes */
    int is_string, escaped;            /* escaped: the string holds backslash escapes */
} jfield;

typedef struct { const char *p, *end; int started; } jcursor;

static void jskip(jcursor *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\r' || *c->p == '\n'))
        c->p++;
}

/* The span of a string whose opening quote `c->p` is on; 0 if unterminated. */
static int jstring(jcursor *c, const char **s, size_t *len, int *escaped)
{
    const char *q = ++c->p;
    *escaped = 0;
    while (q < c->end && *q != '"') {
        if (*q == '\\') {
            *escaped = 1;
            q++;
        }
        q++;
    }
    if (q >= c->end)
        return 0;
    *s = c->p;
    *len = (size_t)(q - c->p);
    c->p = q + 1;
    return 1;
}

/* 1: `f` is the next field; 0: the object ended; -1: not a flat JSON object. */
static int jnext(jcursor *c, jfield *f)
{
    int esc;
    jskip(c);
    if (!c->started) {
        if (c->p >= c->end || *c->p != '{')
            return -1;
        c->p++;
        c->started = 1;
        jskip(c);
        if (c->p < c->end && *c->p == '}')
            return 0;
    } else {
        if (c->p < c->end && *c->p == '}')
            return 0;
        if (c->p >= c->end || *c->p != ',')
            return -1;
        c->p++;
        jskip(c);
    }
    if (c->p >= c->end || *c->p != '"' || !jstring(c, &f->key, &f->key_len, &esc) || esc)
        return -1;
    jskip(c);
    if (c->p >= c->end || *c->p != ':')
        return -1;
    c->p++;
    jskip(c);
    if (c->p >= c->end)
        return -1;
    if (*c->p == '"') {
        f->is_string = 1;
        return jstring(c, &f->val, &f->val_len, &f->escaped) ? 1 : -1;
    }
    f->is_string = f->escaped = 0;
    f->val = c->p;
    while (c->p < c->end && *c->p != ',' && *c->p != '}' && *c->p != ' ')
        c->p++;
    f->val_len = (size_t)(c->p - f->val);
    if (!f->val_len || *f->val == '{' || *f->val == '[')
        return -1;
    return 1;
}

static int jis(const char *s, size_t len, const char *want)
{
    return len == strlen(want) && memcmp(s, want, len) == 0;
}

/* ------------------------------------------------------------------------------------- */
/* client nonces: xoshiro256** seeded once from getrandom (benchmark nonces, not secrets) */

static uint64_t rng[4];

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(void)
{
    uint64_t out = rotl(rng[1] * 5, 7) * 9, t = rng[1] << 17;
    rng[2] ^= rng[0]; rng[3] ^= rng[1]; rng[1] ^= rng[2]; rng[0] ^= rng[3];
    rng[2] ^= t; rng[3] = rotl(rng[3], 45);
    return out;
}

static int rng_seed(void)
{
    size_t got = 0;
    while (got < sizeof rng) {
        ssize_t n = getrandom((char *)rng + got, sizeof rng - got, 0);
        if (n < 0 && errno != EINTR)
            return -1;
        if (n > 0)
            got += (size_t)n;
    }
    return 0;
}

static void client_nonce(char out[65])
{
    uint8_t raw[32];
    for (int i = 0; i < 4; i++) {
        uint64_t v = rng_next();
        memcpy(raw + 8 * i, &v, 8);
    }
    to_hex(raw, 32, out);
}

/* ------------------------------------------------------------------------------------- */
/* self-test against known vectors */

static int check(const char *what, const char *got, const char *want)
{
    int ok = strcmp(got, want) == 0;
    if (!ok)
        fprintf(stderr, "selftest %s: got %s, want %s\n", what, got, want);
    return ok;
}

static int selftest(void)
{
    int ok = 1;
    uint8_t d[32], k[131];
    char hex[65];
    sha256_ctx c;

    sha256_init(&c);
    sha256_update(&c, "abc", 3);
    sha256_final(&c, d);
    to_hex(d, 32, hex);
    ok &= check("SHA-256(abc)", hex,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");

    /* two blocks of padding, fed in uneven pieces */
    static const char two[] = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    sha256_init(&c);
    sha256_update(&c, two, 5);
    sha256_update(&c, two + 5, sizeof two - 1 - 5);
    sha256_final(&c, d);
    to_hex(d, 32, hex);
    ok &= check("SHA-256(abcdbcde...)", hex,
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");

    hmac_key hk;
    memset(k, 0x0b, 20);   /* RFC 4231 test case 1 */
    hmac_setkey(&hk, k, 20);
    hmac(&hk, "Hi There", 8, d);
    to_hex(d, 32, hex);
    ok &= check("HMAC RFC 4231 #1", hex,
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");

    memset(k, 0xaa, 131);  /* RFC 4231 test case 6: a key longer than a block */
    hmac_setkey(&hk, k, 131);
    static const char big[] = "Test Using Larger Than Block-Size Key - Hash Key First";
    hmac(&hk, big, sizeof big - 1, d);
    to_hex(d, 32, hex);
    ok &= check("HMAC RFC 4231 #6", hex,
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");

    /* spec 7.8: V1 client mac, V3 client mac and V3-proof relay mac */
    memset(k, 0xa1, 32);
    hmac_setkey(&key, k, 32);
    relay_id = "relay-1";
    client_mac_hex("testnonce", 9, hex);
    ok &= check("spec V1", hex,
                "5f9c42acc8e201e538e9c5941f132326bcb3988af7dbea9b5b14c65d34afa309");

    for (int i = 0; i < 32; i++) k[i] = (uint8_t)i;
    hmac_setkey(&key, k, 32);
    relay_id = "relay-handshake-test";
    client_mac_hex("0123456789abcdef0123456789abcdef", 32, hex);
    ok &= check("spec V3", hex,
                "b57b07788277baa33a8be041a7769b429c3211f4ddbadd5c5daaa1fa26d68f7c");
    relay_mac_hex("abababababababababababababababababababababababababababababababab",
                  "0123456789abcdef0123456789abcdef", 32, hex);
    ok &= check("spec V3-proof", hex,
                "1f87b0d4e442fb20aaa77fad3b1ad53e2826223f821c6045f07f35c170d1a898");

    puts(ok ? "selftest ok" : "selftest FAILED");
    return ok ? 0 : 1;
}

/* ------------------------------------------------------------------------------------- */
/* the load */

enum { IDLE, CHALLENGE, REPLY };

#define BUF 2048  /* a challenge or reply line longer than this is an error */

typedef struct {
    int fd, state;
    size_t len;
    size_t snlen;
    char snonce[MAX_NONCE];
    char cnonce[65];
    char buf[BUF];
} conn;

static struct sockaddr_storage addr;
static socklen_t addr_len;
static int epfd;
static long connections, errors;
static const char *first_error;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(conn *c, const char *why)
{
    if (!first_error)
        first_error = why;
    errors++;
    close(c->fd);
    c->fd = -1;
    c->state = IDLE;
}

static void start(conn *c, long slot)
{
    static const int one = 1;
    c->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        c->state = IDLE;
        if (!first_error)
            first_error = "socket() failed";
        errors++;
        return;
    }
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->len = 0;
    c->state = CHALLENGE;
    if (connect(c->fd, (struct sockaddr *)&addr, addr_len) < 0 && errno != EINPROGRESS) {
        fail(c, "connect() failed");
        return;
    }
    /* The daemon speaks first, so readable (or an error) is the only event awaited. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = (uint64_t)slot};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        fail(c, "epoll_ctl() failed");
}

/* The challenge (spec 7.5): protocol, version and relay id checked; the answer sent. */
static int on_challenge(conn *c, const char *line, size_t len)
{
    jcursor cur = {line, line + len, 0};
    jfield f;
    int r, protocol = 0, version = 0, rid = 0, nonce = 0;
    while ((r = jnext(&cur, &f)) == 1) {
        if (jis(f.key, f.key_len, "protocol"))
            protocol = f.is_string && jis(f.val, f.val_len, "cmux-relay-auth");
        else if (jis(f.key, f.key_len, "version"))
            version = !f.is_string && jis(f.val, f.val_len, "1");
        else if (jis(f.key, f.key_len, "relay_id"))
            rid = f.is_string && !f.escaped && f.val_len == relay_id_len &&
                  memcmp(f.val, relay_id, relay_id_len) == 0;
        else if (jis(f.key, f.key_len, "nonce")) {
            /* escapes would need decoding before the MAC; the daemon sends hex */
            nonce = f.is_string && !f.escaped && f.val_len > 0 && f.val_len <= MAX_NONCE;
            if (nonce) {
                memcpy(c->snonce, f.val, f.val_len);
                c->snlen = f.val_len;
            }
        }
    }
    if (r < 0 || !protocol || !version || !rid || !nonce)
        return 0;
    char mac[65], out[128 + 512];
    client_nonce(c->cnonce);
    client_mac_hex(c->snonce, c->snlen, mac);
    int n = snprintf(out, sizeof out, "{\"client_nonce\":\"%s\",\"mac\":\"%s\",\"relay_id\":\"%s\"}\n",
                     c->cnonce, mac, relay_id);
    /* a fresh socket's send buffer takes these few bytes whole */
    return write(c->fd, out, (size_t)n) == n;
}

/* The reply: ok true and a relay_mac that proves the daemon holds the token. */
static int on_reply(conn *c, const char *line, size_t len)
{
    jcursor cur = {line, line + len, 0};
    jfield f;
    int r, ok = 0, proved = 0;
    while ((r = jnext(&cur, &f)) == 1) {
        if (jis(f.key, f.key_len, "ok"))
            ok = !f.is_string && jis(f.val, f.val_len, "true");
        else if (jis(f.key, f.key_len, "relay_mac") && f.is_string && f.val_len == 64) {
            char want[65];
            unsigned diff = 0;
            relay_mac_hex(c->cnonce, c->snonce, c->snlen, want);
            for (int i = 0; i < 64; i++)
                diff |= (unsigned char)(f.val[i] ^ want[i]);
            proved = diff == 0;
        }
    }
    return r == 0 && ok && proved;
}

/* Reads what is there and handles each complete line; lines may arrive in pieces. */
static void on_readable(conn *c, long slot, int running)
{
    for (;;) {
        ssize_t n = read(c->fd, c->buf + c->len, BUF - c->len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            fail(c, "read() failed (connection refused or reset?)");
            return;
        }
        if (n == 0) {
            fail(c, c->state == CHALLENGE ? "closed before the challenge"
                                          : "closed before the reply (refused?)");
            return;
        }
        c->len += (size_t)n;
        char *nl;
        while ((nl = memchr(c->buf, '\n', c->len)) != NULL) {
            size_t line = (size_t)(nl - c->buf);
            if (c->state == CHALLENGE) {
                if (!on_challenge(c, c->buf, line)) {
                    fail(c, "relay auth challenge mismatch");
                    return;
                }
                c->state = REPLY;
                c->len -= line + 1;
                memmove(c->buf, nl + 1, c->len);
            } else {
                int ok = on_reply(c, c->buf, line);
                close(c->fd);
                c->fd = -1;
                c->state = IDLE;
                if (!ok) {
                    if (!first_error)
                        first_error = "handshake refused or relay_mac wrong";
                    errors++;
                } else {
                    connections++;
                }
                if (running)
                    start(c, slot);
                return;
            }
        }
        if (c->len == BUF) {
            fail(c, "line too long");
            return;
        }
    }
}

static int read_credentials(void)
{
    static char line1[1024], line2[4096];
    if (!fgets(line1, sizeof line1, stdin) || !fgets(line2, sizeof line2, stdin)) {
        fprintf(stderr, "authload: stdin must hold the relay id, then the hex token\n");
        return -1;
    }
    line1[strcspn(line1, "\r\n")] = 0;
    size_t tl = strcspn(line2, "\r\n \t");
    line2[tl] = 0;
    relay_id = line1;
    relay_id_len = strlen(line1);
    if (relay_id_len > 256) {
        fprintf(stderr, "authload: relay ids longer than 256 bytes are not supported\n");
        return -1;
    }
    /* the id is written into JSON and matched against it verbatim */
    for (size_t i = 0; i < relay_id_len; i++) {
        unsigned char ch = (unsigned char)line1[i];
        if (ch < 0x20 || ch == '"' || ch == '\\') {
            fprintf(stderr, "authload: relay ids with quotes, backslashes or control"
                            " characters are not supported\n");
            return -1;
        }
    }
    uint8_t raw[2048];
    long kl = from_hex(line2, tl, raw);
    if (!relay_id_len || kl <= 0) {
        fprintf(stderr, "authload: empty relay id, or the token is not hex of even length\n");
        return -1;
    }
    hmac_setkey(&key, raw, (size_t)kl);
    memset(raw, 0, sizeof raw);
    memset(line2, 0, sizeof line2);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--selftest") == 0)
        return selftest();
    if (argc != 5) {
        fprintf(stderr, "usage: authload HOST PORT SECONDS CONCURRENCY < credentials\n"
                        "       (stdin: the relay id on line 1, the hex token on line 2)\n"
                        "       authload --selftest\n");
        return 2;
    }
    double seconds = atof(argv[3]);
    long concurrency = atol(argv[4]);
    if (seconds <= 0 || concurrency <= 0) {
        fprintf(stderr, "authload: SECONDS and CONCURRENCY must be positive\n");
        return 2;
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *ai;
    int gai = getaddrinfo(argv[1], argv[2], &hints, &ai);
    if (gai) {
        fprintf(stderr, "authload: %s:%s: %s\n", argv[1], argv[2], gai_strerror(gai));
        return 2;
    }
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
    addr_len = ai->ai_addrlen;
    freeaddrinfo(ai);
    if (read_credentials() < 0 || rng_seed() < 0)
        return 2;

    conn *conns = calloc((size_t)concurrency, sizeof *conns);
    struct epoll_event *events = calloc((size_t)concurrency, sizeof *events);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (!conns || !events || epfd < 0) {
        perror("authload");
        return 2;
    }
    double t0 = now(), deadline = t0 + seconds, give_up = deadline + 10;
    for (long i = 0; i < concurrency; i++)
        start(&conns[i], i);
    for (;;) {
        double t = now();
        int running = t < deadline;
        long busy = 0;
        for (long i = 0; i < concurrency; i++) {
            if (conns[i].state == IDLE && running)
                start(&conns[i], i);  /* a slot whose start failed tries again */
            busy += conns[i].state != IDLE;
        }
        if (!busy || t >= give_up)
            break;
        int n = epoll_wait(epfd, events, (int)concurrency, 100);
        if (n < 0 && errno != EINTR) {
            perror("authload: epoll_wait");
            return 2;
        }
        running = now() < deadline;
        for (int i = 0; i < n; i++) {
            long slot = (long)events[i].data.u64;
            if (conns[slot].state != IDLE)
                on_readable(&conns[slot], slot, running);
        }
    }
    double elapsed = now() - t0;
    for (long i = 0; i < concurrency; i++)
        if (conns[i].state != IDLE)
            fail(&conns[i], "no reply within 10 s after the end");
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
                 (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    if (first_error)
        fprintf(stderr, "authload: %ld errors; the first: %s\n", errors, first_error);
    printf("{\"connections\":%ld,\"errors\":%ld,\"seconds\":%.3f,\"cpu\":%.3f}\n", connections,
           errors, elapsed, cpu);
    fflush(stdout);
    free(conns);
    free(events);
    return 0;
}
