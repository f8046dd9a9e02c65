/*
 * ccidt-client: the PC/SC client that runs inside the test guest.
 *
 * It talks to the guest's pcscd (libpcsclite) and prints one line per event
 * on stdout, every line starting with "CCIDT " so the host can pick them out
 * of the serial console (kernel messages and pcscd output are interleaved).
 *
 * Configuration comes from the environment; /init gets the kernel
 * command-line words "name=value" as environment variables:
 *   steps=STEP,STEP,...   a script (see run_step below for the step language)
 *   apdus=HEX,HEX,...     shorthand: wait-card,connect,apdu:HEX...
 *   repeat=N              with apdus: run the APDU list N times
 *   mode=monitor          print every state change until monitor_ms passes
 *   monitor_ms=MS         length of the monitor mode (default: 1 hour)
 *   reader=SUBSTRING      use the first reader whose name contains it
 *
 * Output lines (t = guest CLOCK_MONOTONIC in ms, i.e. time since boot):
 *   CCIDT start t=...
 *   CCIDT reader t=... name=<rest of line>
 *   CCIDT step n=<i> <step text> t=...
 *   CCIDT state <flag|flag...> t=... count=<n> event=0x... [atr=<hex>]
 *   CCIDT atr <hex> t=...
 *   CCIDT connect rv=0x... proto=t0|t1|raw|none t=... ms=...
 *   CCIDT reconnect rv=0x... proto=... t=... ms=...
 *   CCIDT disconnect rv=0x... t=...
 *   CCIDT apdu <cmd> -> <resp or -> rv=0x... ms=... t=...
 *   CCIDT burst n=... ok=... fail=... min_ms=... avg_ms=... max_ms=... last=<resp> rv=0x... t=...
 *   CCIDT status rv=0x... state=0x... proto=... atr=<hex> t=...
 *   CCIDT mark <text> t=...
 *   CCIDT error n=<i> <message> t=...
 *   CCIDT done rc=<0|1> t=...
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <winscard.h>

#define MAX_STEPS 4096
#define MAX_APDU 4096
#define DEFAULT_WAIT_MS 20000

static SCARDCONTEXT g_ctx;
static int g_have_ctx;
static SCARDHANDLE g_card;
static int g_connected;
static DWORD g_proto;
static char g_reader[512];
static DWORD g_state;     /* last dwEventState seen, CHANGED bit cleared */
static int g_step_index;

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

/* One whole line per printf + fflush: the console is shared with pcscd. */
static void out(const char *fmt, ...)
{
	char buf[8192];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	printf("CCIDT %s\n", buf);
	fflush(stdout);
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

static void hex(const unsigned char *b, size_t n, char *dst)
{
	static const char d[] = "0123456789abcdef";
	for (size_t i = 0; i < n; i++) {
		dst[2 * i] = d[b[i] >> 4];
		dst[2 * i + 1] = d[b[i] & 15];
	}
	dst[2 * n] = 0;
}

static int unhex(const char *s, unsigned char *dst, size_t cap)
{
	size_t n = strlen(s);
	if (n % 2 || n / 2 > cap)
		return -1;
	for (size_t i = 0; i < n / 2; i++) {
		unsigned int v;
		if (sscanf(s + 2 * i, "%2x", &v) != 1)
			return -1;
		dst[i] = (unsigned char)v;
	}
	return (int)(n / 2);
}

static const char *proto_name(DWORD p)
{
	switch (p) {
	case SCARD_PROTOCOL_T0: return "t0";
	case SCARD_PROTOCOL_T1: return "t1";
	case SCARD_PROTOCOL_RAW: return "raw";
	default: return "none";
	}
}

static void flags_text(DWORD s, char *dst, size_t cap)
{
	static const struct { DWORD bit; const char *name; } f[] = {
		{ SCARD_STATE_UNKNOWN, "unknown" }, { SCARD_STATE_UNAVAILABLE, "unavailable" },
		{ SCARD_STATE_EMPTY, "empty" }, { SCARD_STATE_PRESENT, "present" },
		{ SCARD_STATE_EXCLUSIVE, "exclusive" }, { SCARD_STATE_INUSE, "inuse" },
		{ SCARD_STATE_MUTE, "mute" }, { SCARD_STATE_UNPOWERED, "unpowered" },
	};
	dst[0] = 0;
	for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
		if (s & f[i].bit) {
			if (dst[0])
				strncat(dst, "|", cap - strlen(dst) - 1);
			strncat(dst, f[i].name, cap - strlen(dst) - 1);
		}
	}
	if (!dst[0])
		snprintf(dst, cap, "none");
}

/* pcscd may not be listening yet when we start: retry until the deadline. */
static LONG ensure_context(double deadline)
{
	LONG rv;
	if (g_have_ctx)
		return SCARD_S_SUCCESS;
	for (;;) {
		rv = SCardEstablishContext(SCARD_SCOPE_SYSTEM, NULL, NULL, &g_ctx);
		if (rv == SCARD_S_SUCCESS) {
			g_have_ctx = 1;
			return rv;
		}
		if (now_ms() > deadline)
			return rv;
		sleep_ms(50);
	}
}

/* Without udevd pcscd only sees readers present when it started; we poll. */
static int wait_reader(long timeout_ms)
{
	double deadline = now_ms() + timeout_ms;
	const char *want = getenv("reader");
	if (g_reader[0])
		return 0;
	if (ensure_context(deadline) != SCARD_S_SUCCESS)
		return -1;
	for (;;) {
		char buf[4096];
		DWORD len = sizeof buf;
		LONG rv = SCardListReaders(g_ctx, NULL, buf, &len);
		if (rv == SCARD_S_SUCCESS) {
			for (char *r = buf; *r; r += strlen(r) + 1) {
				if (!want || !*want || strstr(r, want)) {
					snprintf(g_reader, sizeof g_reader, "%.511s", r);
					out("reader t=%.1f name=%s", now_ms(), g_reader);
					g_state = SCARD_STATE_UNAWARE;
					return 0;
				}
			}
		}
		if (now_ms() > deadline)
			return -1;
		sleep_ms(50);
	}
}

static void print_state(DWORD s, const unsigned char *atr, DWORD atrlen)
{
	char f[128], a[2 * 64 + 1] = "";
	flags_text(s, f, sizeof f);
	if (atr && atrlen && (s & SCARD_STATE_PRESENT)) {
		hex(atr, atrlen > 33 ? 33 : atrlen, a);
		out("state %s t=%.1f count=%lu event=0x%08lx atr=%s", f, now_ms(),
		    (unsigned long)(s >> 16), (unsigned long)s, a);
	} else {
		out("state %s t=%.1f count=%lu event=0x%08lx", f, now_ms(),
		    (unsigned long)(s >> 16), (unsigned long)s);
	}
}

/*
 * Wait up to timeout_ms for the reader state to differ from g_state (the
 * event counter in the high word counts too, so a fast remove+insert is not
 * missed).  Prints a state line on change.  Returns the PC/SC rv.
 */
static LONG observe(long timeout_ms, unsigned char *atr, DWORD *atrlen)
{
	SCARD_READERSTATE rs;
	LONG rv;
	memset(&rs, 0, sizeof rs);
	rs.szReader = g_reader;
	rs.dwCurrentState = g_state;
	rv = SCardGetStatusChange(g_ctx, timeout_ms < 0 ? 0 : (DWORD)timeout_ms, &rs, 1);
	if (rv != SCARD_S_SUCCESS)
		return rv;
	g_state = rs.dwEventState & ~SCARD_STATE_CHANGED;
	print_state(g_state, rs.rgbAtr, rs.cbAtr);
	if (atr && atrlen) {
		memcpy(atr, rs.rgbAtr, rs.cbAtr);
		*atrlen = rs.cbAtr;
	}
	return rv;
}

enum want { WANT_CARD, WANT_INSERT, WANT_REMOVE };

static int wait_for_state(enum want w, long timeout_ms)
{
	double deadline = now_ms() + timeout_ms;
	DWORD start;
	int was_present;
	unsigned char atr[64];
	DWORD atrlen = 0;
	if (wait_reader(timeout_ms) != 0)
		return -1;
	/* First look without blocking, so the current state is always known. */
	if (g_state == SCARD_STATE_UNAWARE)
		observe(0, atr, &atrlen);
	start = g_state;
	was_present = (start & SCARD_STATE_PRESENT) != 0;
	for (;;) {
		int present = (g_state & SCARD_STATE_PRESENT) != 0;
		int counted = (g_state >> 16) != (start >> 16);
		if (w == WANT_CARD && present)
			break;
		if (w == WANT_INSERT && present && (!was_present || counted))
			break;
		if (w == WANT_REMOVE && (!present || counted))
			break;
		double left = deadline - now_ms();
		if (left <= 0)
			return -1;
		LONG rv = observe((long)left, atr, &atrlen);
		if (rv != SCARD_S_SUCCESS && rv != SCARD_E_TIMEOUT) {
			out("error n=%d SCardGetStatusChange rv=0x%08lx t=%.1f", g_step_index,
			    (unsigned long)rv, now_ms());
			sleep_ms(50);
		}
	}
	if (w != WANT_REMOVE) {
		char a[2 * 64 + 1];
		SCARD_READERSTATE rs;
		memset(&rs, 0, sizeof rs);
		rs.szReader = g_reader;
		rs.dwCurrentState = SCARD_STATE_UNAWARE;
		if (SCardGetStatusChange(g_ctx, 0, &rs, 1) == SCARD_S_SUCCESS && rs.cbAtr) {
			hex(rs.rgbAtr, rs.cbAtr > 33 ? 33 : rs.cbAtr, a);
			out("atr %s t=%.1f", a, now_ms());
		}
	}
	return 0;
}

static DWORD parse_proto(const char *a)
{
	if (!a || !*a || !strcmp(a, "any"))
		return SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1;
	if (!strcmp(a, "t0"))
		return SCARD_PROTOCOL_T0;
	if (!strcmp(a, "t1"))
		return SCARD_PROTOCOL_T1;
	if (!strcmp(a, "raw"))
		return SCARD_PROTOCOL_RAW;
	return 0;
}

static DWORD parse_disposition(const char *a, DWORD dflt)
{
	if (!a || !*a)
		return dflt;
	if (!strcmp(a, "leave"))
		return SCARD_LEAVE_CARD;
	if (!strcmp(a, "reset"))
		return SCARD_RESET_CARD;
	if (!strcmp(a, "unpower"))
		return SCARD_UNPOWER_CARD;
	if (!strcmp(a, "eject"))
		return SCARD_EJECT_CARD;
	return dflt;
}

static int do_connect(const char *arg)
{
	DWORD protos = parse_proto(arg);
	double t0;
	LONG rv;
	if (!protos || wait_reader(DEFAULT_WAIT_MS) != 0)
		return -1;
	if (g_connected) {
		SCardDisconnect(g_card, SCARD_LEAVE_CARD);
		g_connected = 0;
	}
	t0 = now_ms();
	rv = SCardConnect(g_ctx, g_reader, SCARD_SHARE_SHARED, protos, &g_card, &g_proto);
	out("connect rv=0x%08lx proto=%s t=%.1f ms=%.3f", (unsigned long)rv,
	    proto_name(rv == SCARD_S_SUCCESS ? g_proto : 0), now_ms(), now_ms() - t0);
	g_connected = rv == SCARD_S_SUCCESS;
	return g_connected ? 0 : -1;
}

static int do_reconnect(const char *arg)
{
	DWORD init = parse_disposition(arg, SCARD_LEAVE_CARD);
	double t0 = now_ms();
	LONG rv;
	if (!g_connected)
		return do_connect(NULL);
	rv = SCardReconnect(g_card, SCARD_SHARE_SHARED, SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1,
			    init, &g_proto);
	out("reconnect rv=0x%08lx proto=%s t=%.1f ms=%.3f", (unsigned long)rv,
	    proto_name(rv == SCARD_S_SUCCESS ? g_proto : 0), now_ms(), now_ms() - t0);
	if (rv != SCARD_S_SUCCESS) {
		/* The handle is dead (e.g. the card was swapped): start over. */
		SCardDisconnect(g_card, SCARD_LEAVE_CARD);
		g_connected = 0;
		return do_connect(NULL);
	}
	return 0;
}

static int do_disconnect(const char *arg)
{
	LONG rv = SCARD_S_SUCCESS;
	if (g_connected)
		rv = SCardDisconnect(g_card, parse_disposition(arg, SCARD_LEAVE_CARD));
	g_connected = 0;
	out("disconnect rv=0x%08lx t=%.1f", (unsigned long)rv, now_ms());
	return 0;
}

static LONG transmit(const unsigned char *cmd, int n, unsigned char *resp, DWORD *rlen,
		     double *ms)
{
	const SCARD_IO_REQUEST *pci = g_proto == SCARD_PROTOCOL_T1 ? SCARD_PCI_T1
				      : g_proto == SCARD_PROTOCOL_RAW ? SCARD_PCI_RAW
				      : SCARD_PCI_T0;
	double t0 = now_ms();
	LONG rv;
	*rlen = MAX_APDU;
	rv = SCardTransmit(g_card, pci, cmd, (DWORD)n, NULL, resp, rlen);
	*ms = now_ms() - t0;
	if (rv != SCARD_S_SUCCESS)
		*rlen = 0;
	return rv;
}

/* An APDU step never "fails": the rv is the result the host wants to see. */
static int do_apdu(const char *arg)
{
	unsigned char cmd[MAX_APDU], resp[MAX_APDU];
	char ch[2 * MAX_APDU + 1], rh[2 * MAX_APDU + 1];
	DWORD rlen;
	double ms;
	int n = unhex(arg, cmd, sizeof cmd);
	LONG rv;
	if (n < 1) {
		out("error n=%d bad hex: %s t=%.1f", g_step_index, arg, now_ms());
		return -1;
	}
	if (!g_connected && do_connect(NULL) != 0)
		return -1;
	rv = transmit(cmd, n, resp, &rlen, &ms);
	hex(cmd, (size_t)n, ch);
	hex(resp, rlen, rh);
	out("apdu %s -> %s rv=0x%08lx ms=%.3f t=%.1f", ch, rlen ? rh : "-", (unsigned long)rv,
	    ms, now_ms());
	return 0;
}

/* burst:N:HEX sends HEX N times and prints one summary line. */
static int do_burst(const char *arg)
{
	unsigned char cmd[MAX_APDU], resp[MAX_APDU];
	char rh[2 * MAX_APDU + 1] = "-";
	char *colon;
	long count = strtol(arg, &colon, 10);
	long ok = 0, fail = 0;
	double mn = 1e12, mx = 0, sum = 0;
	LONG rv = SCARD_S_SUCCESS;
	int n;
	if (count < 1 || *colon != ':' || (n = unhex(colon + 1, cmd, sizeof cmd)) < 1) {
		out("error n=%d bad burst: %s t=%.1f", g_step_index, arg, now_ms());
		return -1;
	}
	if (!g_connected && do_connect(NULL) != 0)
		return -1;
	for (long i = 0; i < count; i++) {
		DWORD rlen;
		double ms;
		rv = transmit(cmd, n, resp, &rlen, &ms);
		if (rv == SCARD_S_SUCCESS && rlen >= 2)
			ok++;
		else
			fail++;
		mn = ms < mn ? ms : mn;
		mx = ms > mx ? ms : mx;
		sum += ms;
		if (rlen)
			hex(resp, rlen, rh);
		else
			snprintf(rh, sizeof rh, "-");
	}
	out("burst n=%ld ok=%ld fail=%ld min_ms=%.3f avg_ms=%.3f max_ms=%.3f last=%s rv=0x%08lx t=%.1f",
	    count, ok, fail, mn, sum / count, mx, rh, (unsigned long)rv, now_ms());
	return 0;
}

static int do_status(void)
{
	char name[512], a[2 * 64 + 1] = "";
	unsigned char atr[64];
	DWORD nlen = sizeof name, state = 0, proto = 0, alen = sizeof atr;
	LONG rv = SCARD_E_INVALID_HANDLE;
	if (g_connected)
		rv = SCardStatus(g_card, name, &nlen, &state, &proto, atr, &alen);
	if (rv == SCARD_S_SUCCESS)
		hex(atr, alen, a);
	out("status rv=0x%08lx state=0x%08lx proto=%s atr=%s t=%.1f", (unsigned long)rv,
	    (unsigned long)state, proto_name(rv == SCARD_S_SUCCESS ? proto : 0),
	    a[0] ? a : "-", now_ms());
	return 0;
}

static int do_monitor(long ms)
{
	double deadline = now_ms() + ms;
	if (wait_reader(ms) != 0)
		return -1;
	if (g_state == SCARD_STATE_UNAWARE)
		observe(0, NULL, NULL);
	for (;;) {
		double left = deadline - now_ms();
		if (left <= 0)
			return 0;
		LONG rv = observe((long)left, NULL, NULL);
		if (rv != SCARD_S_SUCCESS && rv != SCARD_E_TIMEOUT) {
			out("error n=%d SCardGetStatusChange rv=0x%08lx t=%.1f", g_step_index,
			    (unsigned long)rv, now_ms());
			sleep_ms(100);
		}
	}
}

static long arg_ms(const char *arg, long dflt)
{
	return arg && *arg ? strtol(arg, NULL, 10) : dflt;
}

/*
 * The step language: steps are separated by ',', a step is NAME or NAME:ARG.
 *   wait-reader[:ms]   wait until pcscd lists a reader
 *   wait-card[:ms]     wait until a card is present (at once if it already is)
 *   wait-insert[:ms]   wait for a card insertion after the last observed state
 *   wait-remove[:ms]   wait for a removal after the last observed state
 *   connect[:t0|t1|any|raw]  SCardConnect SHARED (default T0|T1)
 *   reconnect[:leave|reset|unpower]  SCardReconnect (default leave)
 *   disconnect[:leave|reset|unpower|eject]
 *   apdu:HEX           SCardTransmit (connects first if needed)
 *   burst:N:HEX        HEX N times, one summary line
 *   status             SCardStatus on the handle
 *   monitor:ms         print every state change for ms
 *   sleep:ms           sleep
 *   mark:TEXT          print "CCIDT mark TEXT" (a sync point for the host)
 *   begin / loop:N     run the steps between the last begin (or the start) and
 *                      loop N times in total
 * A failing wait (timeout) or connect ends the script with rc=1.
 */
static int run_step(const char *name, const char *arg)
{
	if (!strcmp(name, "wait-reader"))
		return wait_reader(arg_ms(arg, DEFAULT_WAIT_MS));
	if (!strcmp(name, "wait-card"))
		return wait_for_state(WANT_CARD, arg_ms(arg, DEFAULT_WAIT_MS));
	if (!strcmp(name, "wait-insert"))
		return wait_for_state(WANT_INSERT, arg_ms(arg, DEFAULT_WAIT_MS));
	if (!strcmp(name, "wait-remove"))
		return wait_for_state(WANT_REMOVE, arg_ms(arg, DEFAULT_WAIT_MS));
	if (!strcmp(name, "connect"))
		return do_connect(arg);
	if (!strcmp(name, "reconnect"))
		return do_reconnect(arg);
	if (!strcmp(name, "disconnect"))
		return do_disconnect(arg);
	if (!strcmp(name, "apdu"))
		return do_apdu(arg ? arg : "");
	if (!strcmp(name, "burst"))
		return do_burst(arg ? arg : "");
	if (!strcmp(name, "status"))
		return do_status();
	if (!strcmp(name, "monitor"))
		return do_monitor(arg_ms(arg, 3600000));
	if (!strcmp(name, "sleep")) {
		sleep_ms(arg_ms(arg, 0));
		return 0;
	}
	if (!strcmp(name, "mark")) {
		out("mark %s t=%.1f", arg ? arg : "", now_ms());
		return 0;
	}
	out("error n=%d unknown step: %s t=%.1f", g_step_index, name, now_ms());
	return -1;
}

/* apdus=A,B + repeat=N -> "wait-card,connect,begin,apdu:A,apdu:B,loop:N". */
static char *build_default_steps(void)
{
	const char *apdus = getenv("apdus");
	const char *mode = getenv("mode");
	const char *repeat = getenv("repeat");
	char *buf;
	size_t cap, used;
	if (mode && !strcmp(mode, "monitor")) {
		const char *ms = getenv("monitor_ms");
		buf = malloc(64 + (ms ? strlen(ms) : 0));
		sprintf(buf, "wait-reader,monitor:%s", ms && *ms ? ms : "3600000");
		return buf;
	}
	if (!apdus || !*apdus)
		return NULL;
	/* Each APDU gains "apdu:" (5 bytes); commas are already there. */
	cap = 64 + strlen(apdus) * 4 + (repeat ? strlen(repeat) : 0);
	buf = malloc(cap);
	used = (size_t)snprintf(buf, cap, "wait-card,connect,begin");
	for (const char *p = apdus; *p;) {
		size_t n = strcspn(p, ",");
		if (n)
			used += (size_t)snprintf(buf + used, cap - used, ",apdu:%.*s", (int)n, p);
		p += n + (p[n] == ',');
	}
	snprintf(buf + used, cap - used, ",loop:%s", repeat && *repeat ? repeat : "1");
	return buf;
}

int main(void)
{
	char *steps_env = getenv("steps");
	char *script = steps_env && *steps_env ? steps_env : build_default_steps();
	static char *items[MAX_STEPS];
	int count = 0, rc = 0, begin = 0;
	long loops_done = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	out("start t=%.1f", now_ms());
	if (!script) {
		out("error n=0 nothing to do: set steps=, apdus= or mode=monitor t=%.1f", now_ms());
		out("done rc=1 t=%.1f", now_ms());
		return 1;
	}
	script = strdup(script);
	for (char *tok = strtok(script, ","); tok; tok = strtok(NULL, ",")) {
		if (count == MAX_STEPS) {
			out("error n=%d more than %d steps t=%.1f", count, MAX_STEPS, now_ms());
			out("done rc=1 t=%.1f", now_ms());
			return 1;
		}
		items[count++] = tok;
	}

	for (int i = 0; i < count; i++) {
		char name[64], *arg;
		char *colon = strchr(items[i], ':');
		size_t n = colon ? (size_t)(colon - items[i]) : strlen(items[i]);
		snprintf(name, sizeof name, "%.*s", (int)(n < 63 ? n : 63), items[i]);
		arg = colon ? colon + 1 : NULL;
		g_step_index = i;
		if (!strcmp(name, "begin")) {
			begin = i + 1;
			loops_done = 0;
			continue;
		}
		if (!strcmp(name, "loop")) {
			if (++loops_done < arg_ms(arg, 1))
				i = begin - 1;
			else
				loops_done = 0;
			continue;
		}
		out("step n=%d %s t=%.1f", i, items[i], now_ms());
		if (run_step(name, arg) != 0) {
			out("error n=%d step failed: %s t=%.1f", i, items[i], now_ms());
			rc = 1;
			break;
		}
	}
	if (g_connected)
		SCardDisconnect(g_card, SCARD_LEAVE_CARD);
	if (g_have_ctx)
		SCardReleaseContext(g_ctx);
	out("done rc=%d t=%.1f", rc, now_ms());
	return rc;
}
