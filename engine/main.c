/* engine/main.c: the nemo-lua executable: LuaJIT's command line (scripts, -e, -l, -i, -v, --, -)
 * plus a REPL with the `nemo` module preloaded, libedit line editing and history, and Lua paths
 * that find the nemo package and libnemo.so from the executable's own location.
 *
 * Non-obvious rules:
 * - Paths are resolved from /proc/self/exe, never from the current folder: a build tree is
 *   recognised by <exe_dir>/lua/nemo/init.lua; an install by <exe_dir>/../share/lua/5.1 (a
 *   PREFIX or luarocks tree) before the compiled-in NEMO_LUADIR, because luarocks builds with
 *   LUADIR/LIBDIR pointing into its per-rock folder and then moves the files into the tree.
 *   Our entries go before LUA_PATH/LUA_CPATH, which keep working as under luajit (;; included).
 * - Ctrl-C while Lua runs sets a count hook from the signal handler (as luajit.c does); the hook
 *   raises "interrupted!". Hooks never run inside JIT-compiled traces, so code typed at the
 *   REPL (its chunk and the functions defined in it) runs with the JIT off; library code keeps
 *   the JIT. A loop compiled elsewhere may not see the hook: a second Ctrl-C before the hook
 *   fires gets the signal's startup action (normally: end the process), as in luajit.
 * - nemo-lua itself never calls exit() with a Lua state half-run: errors travel as statuses
 *   to main(), which closes the state (running finalizers) and returns 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <luajit.h>

#include <editline/readline.h>

#ifndef NEMO_LUADIR
#define NEMO_LUADIR "/usr/local/share/lua/5.1"
#endif
#ifndef NEMO_LIBDIR
#define NEMO_LIBDIR "/usr/local/lib"
#endif

#define PROGNAME "nemo-lua"
#define HISTORY_FILE ".nemo_lua_history"
#define HISTORY_MAX 1000
#define EXIT_USAGE 2

static lua_State *globalL;
static struct sigaction startup_sigint;      /* SIGINT disposition found at startup */
static volatile sig_atomic_t prompt_sigint;  /* set by Ctrl-C while waiting for input */
static int in_repl;                          /* REPL errors print without the program name */
static char *history_path;

/* ==== messages ==== */

static int is_ident(const char *s, size_t n)
{
    if (n == 0 || (s[0] >= '0' && s[0] <= '9')) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')))
            return 0;
    }
    return 1;
}

static void print_usage(FILE *f)
{
    fputs("usage: " PROGNAME " [options]... [script [args]...]\n"
          "Available options are:\n"
          "  -e chunk  Execute string 'chunk'.\n"
          "  -l name   Require library 'name' (and set the global 'name' to it).\n"
          "  -j cmd    Perform LuaJIT control command.\n"
          "  -O[opt]   Control LuaJIT optimizations.\n"
          "  -i        Enter interactive mode after executing 'script'.\n"
          "  -v        Show version information.\n"
          "  -E        Ignore environment variables LUA_INIT, LUA_PATH, LUA_CPATH.\n"
          "  -h, --help  Show this help.\n"
          "  --info    Show what nemo-lua finds here: libraries, CPU threads, CUDA devices, NCCL, MPI,\n"
          "            the launcher's ranks and the model caches.\n"
          "  --nproc-per-node N  Start N processes (one per device) through Open MPI's mpirun.\n"
          "  --        Stop handling options.\n"
          "  -         Execute stdin and stop handling options.\n"
          "With no script and no -e/-v, starts the REPL (stdin a terminal) or runs stdin.\n", f);
    fflush(f);
}

static void l_message(const char *msg)
{
    fflush(stdout);
    if (!in_repl) fputs(PROGNAME ": ", stderr);
    fputs(msg, stderr);
    fputc('\n', stderr);
    fflush(stderr);
}

/* Print and pop the error on the stack top when status is an error. */
static int report(lua_State *L, int status)
{
    if (status != 0 && !lua_isnil(L, -1)) {
        const char *msg = lua_tostring(L, -1);
        if (msg == NULL) msg = "(error object is not a string)";
        l_message(msg);
        lua_pop(L, 1);
    }
    return status;
}

/* Message handler: the error (through __tostring when it has one) plus a traceback. */
static int traceback(lua_State *L)
{
    if (!lua_isstring(L, 1)) {
        if (!(luaL_callmeta(L, 1, "__tostring") && lua_isstring(L, -1)))
            lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
        lua_replace(L, 1);
    }
    luaL_traceback(L, L, lua_tostring(L, 1), 1);
    return 1;
}

/* ==== Ctrl-C ==== */

static void set_sigint(void (*handler)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);   /* no SA_RESTART: a blocking read returns EINTR */
}

static void restore_sigint(void) { sigaction(SIGINT, &startup_sigint, NULL); }

static void lstop(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    luaL_where(L, 0);   /* a C hook adds no frame: luaL_error would point at the wrong one */
    lua_pushfstring(L, "%sinterrupted!", lua_tostring(L, -1));
    lua_error(L);
}

static void on_sigint_running(int sig)
{
    (void)sig;
    restore_sigint();   /* a second Ctrl-C acts as it would without us (usually: terminate) */
    lua_sethook(globalL, lstop, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

static void on_sigint_prompt(int sig)
{
    (void)sig;
    prompt_sigint = 1;
}

/* Call the function under narg arguments with the traceback handler and Ctrl-C armed. */
static int docall(lua_State *L, int narg, int nres)
{
    int base = lua_gettop(L) - narg;
    lua_pushcfunction(L, traceback);
    lua_insert(L, base);
    set_sigint(on_sigint_running);
    int status = lua_pcall(L, narg, nres, base);
    restore_sigint();
    if (lua_gethook(L) == lstop) lua_sethook(L, NULL, 0, 0);   /* Ctrl-C as the call returned */
    lua_remove(L, base);
    if (status != 0) lua_gc(L, LUA_GCCOLLECT, 0);
    return status;
}

static int dostring(lua_State *L, const char *s, const char *name)
{
    int status = luaL_loadbuffer(L, s, strlen(s), name);
    if (status == 0) status = docall(L, 0, 0);
    return report(L, status);
}

static int dofile(lua_State *L, const char *name)
{
    int status = luaL_loadfile(L, name);
    if (status == 0) status = docall(L, 0, 0);
    return report(L, status);
}

/* require(name); the result stays on the stack when ok. */
static int dorequire(lua_State *L, const char *name)
{
    lua_getglobal(L, "require");
    lua_pushstring(L, name);
    return docall(L, 1, 1);
}

/* -l name: require it, and set the global when the name is an identifier (as Lua 5.4 does). */
static int dolibrary(lua_State *L, const char *name)
{
    int status = dorequire(L, name);
    if (status != 0) return report(L, status);
    if (is_ident(name, strlen(name)) && !lua_isnil(L, -1) && !lua_isboolean(L, -1)) lua_setglobal(L, name);
    else lua_pop(L, 1);
    return 0;
}

/* ==== LuaJIT -j / -O ==== */

/* Call the function on the stack top with "a,b,c" split at commas (empty parts are nil). */
static int run_with_opts(lua_State *L, const char *opt)
{
    int narg = 0;
    while (opt && *opt) {
        const char *comma = strchr(opt, ',');
        size_t n = comma ? (size_t)(comma - opt) : strlen(opt);
        if (n) lua_pushlstring(L, opt, n); else lua_pushnil(L);
        narg++;
        opt = comma ? comma + 1 : NULL;
    }
    return report(L, docall(L, narg, 0));
}

/* -j cmd[=arg,...]: a jit.* function (jit.off, jit.flush) or a jit.<cmd> module's start. */
static int dojitcmd(lua_State *L, const char *cmd)
{
    const char *eq = strchr(cmd, '=');
    size_t n = eq ? (size_t)(eq - cmd) : strlen(cmd);
    lua_getglobal(L, "jit");
    lua_pushlstring(L, cmd, n);
    lua_gettable(L, -2);
    lua_remove(L, -2);
    if (!lua_isfunction(L, -1)) {
        lua_pop(L, 1);
        lua_pushliteral(L, "jit.");
        lua_pushlstring(L, cmd, n);
        lua_concat(L, 2);
        int status = dorequire(L, lua_tostring(L, -1));
        lua_remove(L, -2);
        if (status != 0 && strncmp(lua_tostring(L, -1) ? lua_tostring(L, -1) : "", "module ", 7) == 0) {
            lua_pop(L, 1);
            lua_pushnil(L);   /* not found: the message below */
        } else if (status != 0) {
            return report(L, status);
        }
        if (lua_istable(L, -1)) {
            lua_getfield(L, -1, "start");
            lua_remove(L, -2);
        }
        if (!lua_isfunction(L, -1)) {
            lua_pop(L, 1);
            l_message("unknown LuaJIT command or jit.* modules not installed");
            return 1;
        }
    }
    return run_with_opts(L, eq ? eq + 1 : NULL);
}

static int dojitopt(lua_State *L, const char *opt)
{
    int status = dorequire(L, "jit.opt");
    if (status != 0) return report(L, status);
    lua_getfield(L, -1, "start");
    lua_remove(L, -2);
    return run_with_opts(L, opt);
}

/* ==== paths ==== */

static int file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* package[field] = prefix .. ";" .. package[field] */
static void prepend_path(lua_State *L, const char *field, const char *prefix)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, field);
    const char *old = lua_tostring(L, -1);
    lua_pushfstring(L, "%s;%s", prefix, old ? old : "");
    lua_setfield(L, -3, field);
    lua_pop(L, 2);
}

static void add_luadir(lua_State *L, const char *dir)
{
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua", dir, dir);
    prepend_path(L, "path", lua_tostring(L, -1));
    lua_pop(L, 1);
}

/* Put the nemo package first on package.path and point NEMO_LIB at libnemo.so (unless set). */
static void setup_paths(lua_State *L)
{
    char exe[PATH_MAX], buf[PATH_MAX + 64];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    const char *nemo_lib = getenv("NEMO_LIB");
    int lib_set = nemo_lib && *nemo_lib;
    if (n > 0) {
        exe[n] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) *slash = 0;
    } else {
        exe[0] = 0;   /* no /proc: only the compiled-in locations */
    }
    /* build tree: ./nemo-lua beside lua/ and build/ */
    if (exe[0]) {
        snprintf(buf, sizeof buf, "%s/lua/nemo/init.lua", exe);
        if (file_exists(buf)) {
            snprintf(buf, sizeof buf, "%s/lua", exe);
            add_luadir(L, buf);
            snprintf(buf, sizeof buf, "%s/build/libnemo.so", exe);
            if (!lib_set && file_exists(buf)) setenv("NEMO_LIB", buf, 1);
            return;
        }
    }
    /* installed: beside the executable first (PREFIX or luarocks tree), then compiled-in paths */
    const char *luadirs[] = { "%s/../share/lua/5.1", NEMO_LUADIR };
    for (size_t i = 0; i < sizeof luadirs / sizeof *luadirs; i++) {
        if (i == 0 && !exe[0]) continue;
        char dir[PATH_MAX + 32], init[PATH_MAX + 64];
        snprintf(dir, sizeof dir, luadirs[i], exe);
        snprintf(init, sizeof init, "%s/nemo/init.lua", dir);
        if (file_exists(init)) {
            char real[PATH_MAX];
            add_luadir(L, realpath(dir, real) ? real : dir);
            break;
        }
    }
    if (lib_set) return;
    const char *libs[] = { "%s/../lib/lua/5.1/libnemo.so", "%s/../lib/libnemo.so",
                           NEMO_LIBDIR "/libnemo.so" };
    for (size_t i = 0; i < sizeof libs / sizeof *libs; i++) {
        if (i < 2 && !exe[0]) continue;
        snprintf(buf, sizeof buf, libs[i], exe);
        if (file_exists(buf)) {
            char real[PATH_MAX];
            setenv("NEMO_LIB", realpath(buf, real) ? real : buf, 1);
            return;
        }
    }
}

/* ==== version ==== */

/* "nemo-lua 0.1.0 (LuaJIT 2.1.0-beta3)"; loads the nemo module (an error is a warning here). */
static void print_version(lua_State *L)
{
    const char *nemo_version = "(nemo module not loaded)";
    int status = dorequire(L, "nemo");
    if (status == 0) {
        if (lua_istable(L, -1)) {
            lua_getfield(L, -1, "version");
            lua_replace(L, -2);
        }
        if (lua_isstring(L, -1)) nemo_version = lua_tostring(L, -1);
    } else {
        lua_pushfstring(L, "warning: cannot load the nemo module: %s", lua_tostring(L, -1));
        l_message(lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    lua_getglobal(L, "jit");
    lua_getfield(L, -1, "version");
    printf(PROGNAME " %s (%s)\n", nemo_version, lua_isstring(L, -1) ? lua_tostring(L, -1) : LUAJIT_VERSION);
    fflush(stdout);
    lua_pop(L, 3);
}

/* ==== REPL ==== */

static void save_history(void)
{
    if (history_path) write_history(history_path);
}

/* Tab completion: names of globals, or fields of a.b.c / a:b. Only raw gets and table
 * __index chains are followed, so completing never runs user code. */
static char **completions;
static size_t ncompletions;

/* Replace the value at index i by its metatable's __index; 0 when there is none. */
static int follow_index(lua_State *L, int i)
{
    if (!lua_getmetatable(L, i)) return 0;
    lua_getfield(L, -1, "__index");
    lua_remove(L, -2);
    if (lua_isnil(L, -1)) { lua_pop(L, 1); return 0; }
    lua_replace(L, i);
    return 1;
}

static void add_completions(lua_State *L, int v, const char *prefix, const char *stem)
{
    size_t plen = strlen(prefix), stemlen = strlen(stem);
    for (int depth = 0; depth < 8; depth++) {
        if (lua_istable(L, v)) {
            lua_pushnil(L);
            while (lua_next(L, v)) {
                lua_pop(L, 1);
                size_t klen;
                const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &klen) : NULL;
                if (!k || klen < stemlen || memcmp(k, stem, stemlen) != 0 || !is_ident(k, klen)) continue;
                if (ncompletions >= 4096) continue;
                char **grown = realloc(completions, (ncompletions + 1) * sizeof *completions);
                char *s = grown ? malloc(plen + klen + 1) : NULL;
                if (grown) completions = grown;
                if (!s) continue;
                memcpy(s, prefix, plen);
                memcpy(s + plen, k, klen + 1);
                completions[ncompletions++] = s;
            }
        }
        if (!follow_index(L, v) || !lua_istable(L, v)) break;
    }
}

static char *completion_entry(const char *text, int state)
{
    (void)text;
    static size_t next;
    if (state == 0) next = 0;
    if (next < ncompletions) {
        char *s = completions[next];
        completions[next++] = NULL;   /* readline frees it */
        return s;
    }
    return NULL;
}

static char **complete(const char *text, int start, int end)
{
    (void)start; (void)end;
    lua_State *L = globalL;
    rl_attempted_completion_over = 1;   /* never fall back to file names */
    for (size_t i = 0; i < ncompletions; i++) free(completions[i]);
    ncompletions = 0;
    if (!lua_checkstack(L, 8)) return NULL;
    int top = lua_gettop(L);
    const char *sep = NULL;
    for (const char *p = text; *p; p++) if (*p == '.' || *p == ':') sep = p;
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    int cur = lua_gettop(L);
    for (const char *p = text; sep && p < sep;) {   /* walk a.b.c up to the last separator */
        const char *q = p;
        while (q < sep && *q != '.' && *q != ':') q++;
        int found = 0;
        for (int depth = 0; depth < 8 && !found; depth++) {
            if (lua_istable(L, cur)) {
                lua_pushlstring(L, p, (size_t)(q - p));
                lua_rawget(L, cur);
                if (!lua_isnil(L, -1)) { lua_replace(L, cur); found = 1; break; }
                lua_pop(L, 1);
            }
            if (!follow_index(L, cur) || !lua_istable(L, cur)) break;
        }
        if (!found) { lua_settop(L, top); return NULL; }
        p = q + 1;
    }
    char *prefix = strndup(text, sep ? (size_t)(sep - text + 1) : 0);
    if (prefix) add_completions(L, cur, prefix, sep ? sep + 1 : text);
    free(prefix);
    lua_settop(L, top);
    if (ncompletions == 0) return NULL;
    return rl_completion_matches(text, completion_entry);
}

static void repl_init_tty(void)
{
    rl_readline_name = "nemo-lua";
    rl_catch_signals = 0;   /* our SIGINT handler makes readline() return; see read_line */
    rl_attempted_completion_function = complete;
    static char word_break[] = " \t\n\"\\'`@$><=;|&{}()[],+-*/%^~#";
    rl_completer_word_break_characters = word_break;
    rl_basic_word_break_characters = word_break;
    rl_completion_append_character = '\0';
    using_history();
    stifle_history(HISTORY_MAX);
    const char *home = getenv("HOME");
    if (home && *home) {
        size_t n = strlen(home) + sizeof HISTORY_FILE + 2;
        history_path = malloc(n);
        if (history_path) {
            snprintf(history_path, n, "%s/%s", home, HISTORY_FILE);
            read_history(history_path);   /* missing on first use: fine */
            atexit(save_history);         /* also when the user calls os.exit() */
        }
    }
}

/* One line of input without its newline (malloc'd), or NULL at end of input; *interrupted is
 * set when Ctrl-C came instead of a line. */
static char *read_line(lua_State *L, int tty, int firstline, int *interrupted)
{
    char *line = NULL;
    *interrupted = 0;
    prompt_sigint = 0;
    set_sigint(on_sigint_prompt);
    if (tty) {
        lua_getglobal(L, firstline ? "_PROMPT" : "_PROMPT2");
        const char *prompt = lua_tostring(L, -1);
        if (!prompt) prompt = firstline ? "> " : ">> ";
        fflush(stdout);
        line = readline(prompt);
        lua_pop(L, 1);
    } else {
        size_t cap = 0;
        ssize_t n = getline(&line, &cap, stdin);
        if (n < 0) {
            free(line);
            line = NULL;
            clearerr(stdin);
        } else if (n > 0 && line[n - 1] == '\n') {
            line[n - 1] = 0;
        }
    }
    restore_sigint();
    if (prompt_sigint) {
        free(line);
        *interrupted = 1;
        return NULL;
    }
    return line;
}

/* Syntax error ending in '<eof>': the chunk may go on in the next line. */
static int incomplete(lua_State *L, int status)
{
    if (status != LUA_ERRSYNTAX) return 0;
    size_t len;
    const char *msg = lua_tolstring(L, -1, &len);
    return msg && len >= 7 && strcmp(msg + len - 7, "'<eof>'") == 0;
}

/* Read one statement or expression (several lines while incomplete) and push its compiled
 * chunk: 0 = chunk pushed, an error status = message pushed, -1 = end of input. Tries the
 * text as an expression list first (so that expressions print their values), then as
 * statements; either one failing at '<eof>' asks for another line. */
static int read_chunk(lua_State *L, int tty)
{
    int firstline = 1;
    lua_settop(L, 0);
    lua_pushliteral(L, "");   /* index 1: the text so far */
    for (;;) {
        int interrupted;
        char *line = read_line(L, tty, firstline, &interrupted);
        if (interrupted) {   /* Ctrl-C at the prompt: drop what was typed, prompt again */
            if (tty) fputs("\n", stdout);
            lua_settop(L, 0);
            lua_pushliteral(L, "");
            firstline = 1;
            continue;
        }
        if (!line) return -1;
        if (tty && line[0]) {   /* one history entry per line; skip repeats of the last */
            HIST_ENTRY *last = history_length > 0 ? history_get(history_base + history_length - 1) : NULL;
            if (!last || strcmp(last->line, line) != 0) add_history(line);
        }
        if (firstline && line[0] == '=') lua_pushfstring(L, "return %s", line + 1);
        else lua_pushstring(L, line);
        free(line);
        if (!firstline) {   /* text .. "\n" .. line */
            lua_pushvalue(L, 1);
            lua_insert(L, -2);
            lua_pushliteral(L, "\n");
            lua_insert(L, -2);
            lua_concat(L, 3);
        }
        lua_replace(L, 1);
        firstline = 0;

        const char *text = lua_tostring(L, 1);
        /* 1. the expressions passed through a local function, not "return <text>": a tail
         * call would lose the error position of error("x"); the ")" stays on the text's last
         * line, where LuaJIT puts the code of the last expression; 2. "return <text>" (it accepts a
         * trailing ';', and tells whether an expression is incomplete); 3. statements */
        int more = 0;
        for (int variant = 0; variant < 3; variant++) {
            if (variant == 0)
                lua_pushfstring(L, "local function _nemo_repl_(...) return ... end "
                                   "return _nemo_repl_(%s%s)", text,
                                strstr(text, "--") ? "\n" : "");   /* end a comment, not the line */
            else
                lua_pushfstring(L, "%s%s", variant == 1 ? "return " : "", text);
            size_t clen;
            const char *code = lua_tolstring(L, -1, &clen);
            int status = luaL_loadbuffer(L, code, clen, "=stdin");
            if (status == 0) { lua_replace(L, 1); lua_settop(L, 1); return 0; }
            if (variant > 0 && incomplete(L, status)) more = 1;
            if (variant == 2 && !more) { lua_replace(L, 1); lua_settop(L, 1); return status; }
            lua_settop(L, 1);
        }
    }
}

static void repl(lua_State *L)
{
    int tty = isatty(0);
    in_repl = 1;
    lua_getglobal(L, "nemo");
    int have_nemo = !lua_isnil(L, -1);
    lua_pop(L, 1);
    if (!have_nemo) {
        int status = dorequire(L, "nemo");
        if (status == 0) lua_setglobal(L, "nemo");
        else report(L, status);
    }
    if (tty) {
        repl_init_tty();
        lua_getglobal(L, "nemo");
        if (lua_istable(L, -1)) {
            lua_getfield(L, -1, "version");
            lua_replace(L, -2);
        }
        lua_getglobal(L, "jit");
        lua_getfield(L, -1, "version");
        printf(PROGNAME " %s (%s): `nemo` is loaded; Ctrl-C interrupts, Ctrl-D exits.\n",
               lua_isstring(L, -3) ? lua_tostring(L, -3) : "(nemo not loaded)",
               lua_isstring(L, -1) ? lua_tostring(L, -1) : LUAJIT_VERSION);
        lua_settop(L, 0);
    }
    int status;
    while ((status = read_chunk(L, tty)) != -1) {
        if (status == 0) {
            luaJIT_setmode(L, 1, LUAJIT_MODE_ALLFUNC | LUAJIT_MODE_OFF);   /* interruptible */
            status = docall(L, 0, LUA_MULTRET);
        }
        fflush(stdout);
        report(L, status);
        if (status == 0 && lua_gettop(L) > 0) {   /* print the results with print(): tostring */
            lua_getglobal(L, "print");
            lua_insert(L, 1);
            if (lua_pcall(L, lua_gettop(L) - 1, 0, 0) != 0)
                l_message(lua_pushfstring(L, "error calling 'print' (%s)", lua_tostring(L, -1)));
        }
        lua_settop(L, 0);
        fflush(stdout);
    }
    lua_settop(L, 0);
    if (tty) fputs("\n", stdout);
    fflush(stdout);
    in_repl = 0;
}

/* ==== command line ==== */

enum { F_INTERACTIVE = 1, F_VERSION = 2, F_EXEC = 4, F_NOENV = 8, F_HELP = 16, F_INFO = 32 };

/* ==== --nproc-per-node: start the processes through mpirun ==== */

static long nproc_per_node = 1;

/* Re-exec as `mpirun -np N [--oversubscribe] [--allow-run-as-root] --bind-to none -x
 * OMP_NUM_THREADS <this exe> <the command line without --nproc-per-node>`. Each rank then finds
 * RANK / WORLD_SIZE / LOCAL_RANK in Open MPI's OMPI_COMM_WORLD_* variables (nemo.dist.env()).
 * --bind-to none: mpirun would pin each rank to one core, and a rank needs its share of the
 * cores for its OpenMP and OpenBLAS threads (OMP_NUM_THREADS = cores / N unless already set).
 * NEMO_MPIRUN names another mpirun. Returns an exit status on failure, or -1 when this process
 * already is one of the N ranks (then it just runs). */
static int launch_nproc(int argc, char **argv, int argn, long n)
{
    const char *ws = getenv("OMPI_COMM_WORLD_SIZE");
    if (ws && *ws) {
        if (strtol(ws, NULL, 10) == n) return -1;   /* already one of the N ranks: just run */
        fprintf(stderr, PROGNAME ": --nproc-per-node %ld inside an MPI job of %s processes "
                "(OMPI_COMM_WORLD_SIZE): drop --nproc-per-node, or run nemo-lua outside mpirun\n", n, ws);
        return EXIT_USAGE;
    }
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (cores < 1) cores = 1;
    char threads[32];
    snprintf(threads, sizeof threads, "%ld", cores / n > 0 ? cores / n : 1);
    setenv("OMP_NUM_THREADS", threads, 0);
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0) { fprintf(stderr, PROGNAME ": cannot read /proc/self/exe: %s\n", strerror(errno)); return EXIT_FAILURE; }
    exe[len] = 0;
    char np[32];
    snprintf(np, sizeof np, "%ld", n);
    const char *mpirun = getenv("NEMO_MPIRUN");
    if (!mpirun || !*mpirun) mpirun = "mpirun";
    char **av = calloc((size_t)argc + 16, sizeof *av);
    if (!av) { fputs(PROGNAME ": out of memory\n", stderr); return EXIT_FAILURE; }
    int k = 0;
    av[k++] = (char *)mpirun;
    av[k++] = "-np";
    av[k++] = np;
    if (n > cores) av[k++] = "--oversubscribe";
    if (geteuid() == 0) av[k++] = "--allow-run-as-root";
    av[k++] = "--bind-to";
    av[k++] = "none";
    av[k++] = "-x";
    av[k++] = "OMP_NUM_THREADS";
    av[k++] = exe;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i < argn && strncmp(a, "--nproc-per-node", 16) == 0) {
            if (a[16] == 0) i++;   /* and its value */
            continue;
        }
        av[k++] = argv[i];
    }
    av[k] = NULL;
    fflush(stdout);
    execvp(mpirun, av);
    fprintf(stderr, PROGNAME ": --nproc-per-node %ld starts the processes with Open MPI's mpirun, but '%s' "
            "cannot be run (%s); install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin), set NEMO_MPIRUN, "
            "or launch with mpirun / srun yourself\n", n, mpirun, strerror(errno));
    free(av);
    return EXIT_FAILURE;
}

/* Index of the script in argv (argc when none), or -1 after printing a usage error. */
static int collectargs(int argc, char **argv, int *flags)
{
    int i;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] != '-' || a[1] == 0) return i;   /* script, or "-" for stdin */
        if (strcmp(a, "--") == 0) return i + 1;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) { *flags |= F_HELP; continue; }
        if (strcmp(a, "--info") == 0) { *flags |= F_INFO; continue; }
        if (strncmp(a, "--nproc-per-node", 16) == 0 && (a[16] == 0 || a[16] == '=')) {
            const char *v = a[16] == '=' ? a + 17 : (i + 1 < argc ? argv[++i] : NULL);
            char *end;
            errno = 0;
            long n = v ? strtol(v, &end, 10) : 0;
            if (!v || !*v || *end || errno || n < 1) {
                fprintf(stderr, PROGNAME ": --nproc-per-node expects a positive integer, got '%s'\n",
                        v ? v : "(nothing)");
                return -1;
            }
            nproc_per_node = n;
            continue;
        }
        switch (a[1]) {
        case 'i': case 'v': case 'E':
            if (a[2]) goto bad;
            *flags |= a[1] == 'i' ? F_INTERACTIVE : a[1] == 'v' ? F_VERSION : F_NOENV;
            break;
        case 'e': case 'l': case 'j':
            if (a[1] == 'e') *flags |= F_EXEC;
            if (a[2] == 0 && ++i >= argc) {
                fprintf(stderr, PROGNAME ": '%s' needs an argument\n", a);
                print_usage(stderr);
                return -1;
            }
            break;
        case 'O':
            break;
        default:
        bad:
            fprintf(stderr, PROGNAME ": unrecognized option '%s'\n", a);
            print_usage(stderr);
            return -1;
        }
    }
    return i;
}

/* Run -e, -l, -j, -O in order. */
static int runargs(lua_State *L, char **argv, int argn)
{
    for (int i = 1; i < argn; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) break;
        if (strcmp(a, "--nproc-per-node") == 0) { i++; continue; }
        if (a[0] != '-' || a[1] == '-') continue;
        char opt = a[1];
        if (opt == 'e' || opt == 'l' || opt == 'j') {
            const char *v = a[2] ? a + 2 : argv[++i];
            int status = opt == 'e' ? dostring(L, v, "=(command line)")
                       : opt == 'l' ? dolibrary(L, v) : dojitcmd(L, v);
            if (status != 0) return status;
        } else if (opt == 'O') {
            if (dojitopt(L, a + 2) != 0) return 1;
        }
    }
    return 0;
}

static void createargtable(lua_State *L, char **argv, int argc, int argn)
{
    lua_createtable(L, argc - argn, argn);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - argn);
    }
    lua_setglobal(L, "arg");
}

/* Run the script argv[0] ("-" = stdin unless after "--") with arg[1..] as its `...`. */
static int handle_script(lua_State *L, char **argx)
{
    const char *fname = argx[0];
    if (strcmp(fname, "-") == 0 && strcmp(argx[-1], "--") != 0) fname = NULL;
    int status = luaL_loadfile(L, fname);
    if (status == 0) {
        int narg = 0;
        lua_getglobal(L, "arg");   /* read back: LUA_INIT or -e may have changed it */
        if (lua_istable(L, -1)) {
            int t = lua_gettop(L);
            for (int k = 1;; k++) {
                lua_rawgeti(L, t, k);
                if (lua_isnil(L, -1)) { lua_pop(L, 1); break; }
                luaL_checkstack(L, 2, "too many arguments to script");
                narg++;
            }
            lua_remove(L, t);
        } else {
            lua_pop(L, 1);
        }
        status = docall(L, narg, 0);
    }
    return report(L, status);
}

static int handle_luainit(lua_State *L)
{
    const char *init = getenv("LUA_INIT");
    if (init == NULL) return 0;
    if (init[0] == '@') return dofile(L, init + 1);
    return dostring(L, init, "=LUA_INIT");
}

static struct {
    int argc, argn, flags, status;
    char **argv;
} smain;

static int pmain(lua_State *L)
{
    char **argv = smain.argv;
    int argc = smain.argc, argn = smain.argn, flags = smain.flags;
    globalL = L;
    if (flags & F_NOENV) {
        lua_pushboolean(L, 1);
        lua_setfield(L, LUA_REGISTRYINDEX, "LUA_NOENV");
    }
    lua_gc(L, LUA_GCSTOP, 0);
    luaL_openlibs(L);
    lua_gc(L, LUA_GCRESTART, -1);
    setup_paths(L);
    createargtable(L, argv, argc, argn);
    if (!(flags & F_NOENV) && (smain.status = handle_luainit(L)) != 0) return 0;
    if (flags & F_VERSION) print_version(L);
    if ((flags & F_INFO) && (smain.status = dostring(L, "io.write(require('nemo.envinfo').report())",
                                                     "=--info")) != 0) return 0;
    if ((smain.status = runargs(L, argv, argn)) != 0) return 0;
    if (argc > argn && (smain.status = handle_script(L, argv + argn)) != 0) return 0;
    if (flags & F_INTERACTIVE) {
        repl(L);
    } else if (argc == argn && !(flags & (F_EXEC | F_VERSION | F_INFO))) {
        if (isatty(0)) repl(L);
        else smain.status = dofile(L, NULL);   /* stdin as a script, as luajit does */
    }
    return 0;
}

int main(int argc, char **argv)
{
    static char *empty_argv[2] = { PROGNAME, NULL };
    if (argc < 1 || !argv[0]) { argc = 1; argv = empty_argv; }
    setenv("OMP_WAIT_POLICY", "PASSIVE", 0);   /* idle OpenMP threads sleep instead of spinning */
    /* Debian's OpenBLAS does not recognise every newer CPU and then falls back to its slowest
     * generic kernels (about 4x slower GEMMs measured here). Pick the kernel family from the
     * CPU's features, unless the environment already chose one (it is read when libnemo loads
     * OpenBLAS, so it must be set before any Lua runs). */
#if defined(__x86_64__)
    if (!getenv("OPENBLAS_CORETYPE")) {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) setenv("OPENBLAS_CORETYPE", "SkylakeX", 0);
        else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) setenv("OPENBLAS_CORETYPE", "Haswell", 0);
    }
#endif
    sigaction(SIGINT, NULL, &startup_sigint);

    int flags = 0;
    int argn = collectargs(argc, argv, &flags);
    if (argn < 0) return EXIT_USAGE;
    if (flags & F_HELP) { print_usage(stdout); return 0; }
    if (nproc_per_node > 1) {
        int rc = launch_nproc(argc, argv, argn, nproc_per_node);
        if (rc >= 0) return rc;
    }

    lua_State *L = luaL_newstate();
    if (!L) { l_message("cannot create state: not enough memory"); return EXIT_FAILURE; }
    smain.argc = argc;
    smain.argv = argv;
    smain.argn = argn;
    smain.flags = flags;
    int status = lua_cpcall(L, pmain, NULL);
    report(L, status);
    /* the only place that ends a job: under MPI a failing rank aborts the others, so they do
     * not wait in a collective until the timeout */
    if (status || smain.status)
        (void)luaL_dostring(L, "local d = package.loaded['nemo.dist'] if d and d.is_initialized() and "
                         "d.get_backend() ~= 'self' and d.get_world_size() > 1 then d.abort(1) end");
    lua_close(L);
    return (status || smain.status) ? EXIT_FAILURE : EXIT_SUCCESS;
}
