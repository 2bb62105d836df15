// comigs-kill-resume: kills comigs-demo (or comigs-demo-mpi under mpiexec) at chosen and random points,
// resumes it, and checks that the run ends with results.json equal number for number to an
// uninterrupted run (timings and the host-reuse flag excepted), and curves.svg and routing.html equal
// byte for byte. The ctest tests of issue 26 run it (examples/CMakeLists.txt, examples/mpi/).
//
//   comigs-kill-resume --dir D --demo comigs-demo --compare comigs-compare-results
//       --attempt kill=comigs-1g1s/2 --attempt kill=random --attempt term=fedavg/1,damage=truncate
//       -- --quick --quiet --methods comigs-1g1s,fedavg --rounds 5
//
// Each --attempt starts the demo with --checkpoint-dir D/checkpoints (with --resume after the first)
// and ends it:
//   kill=M/R        SIGKILL to the whole process tree as soon as this start has written method M's
//                   generation of R rounds (a power cut: mpiexec and every rank at once);
//   kill=random     SIGKILL after a random delay within the uninterrupted run's duration;
//   term=M/R        SIGTERM to the demo processes (every rank) once that generation exists: the demo
//                   must stop at the end of its round, save and exit with 128 + 15;
//   np=N            run comigs-demo-mpi (--demo-mpi) on N ranks instead of comigs-demo;
//   damage=truncate|flip|manifest   afterwards, damage the newest generation of the method the kill
//                   named (a user file cut in half, a flipped byte in the server file, a cut manifest):
//                   the next start must report it unusable and fall back to the previous generation.
// Then a final start (--final-np ranks, or in process) runs to the end, and the outputs are compared
// with the reference run's. Every kill=M/R or term must interrupt the run (it is an error if the demo
// finished first or never writes that generation: put random kills after the chosen ones, as they may
// overtake them), and some start must have resumed from a generation.
#include <CLI/CLI.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;

namespace {

struct Attempt {
    std::string text;
    int np = 0;            // 0: the in-process demo
    bool random = false;   // kill after a random delay
    bool term = false;     // SIGTERM instead of SIGKILL
    std::string method;    // kill when <method>/round-<round> exists
    int round = 0;
    std::string damage;    // truncate | flip | manifest
};

[[noreturn]] void fail(const std::string& why) {
    std::fprintf(stderr, "comigs-kill-resume: FAILED: %s\n", why.c_str());
    std::exit(1);
}

Attempt parse_attempt(const std::string& spec) {
    Attempt a;
    a.text = spec;
    std::stringstream ss(spec);
    std::string item;
    while (std::getline(ss, item, ',')) {
        const auto eq = item.find('=');
        if (eq == std::string::npos) fail("--attempt '" + spec + "': '" + item + "' is not key=value");
        const std::string k = item.substr(0, eq), v = item.substr(eq + 1);
        if (k == "np") {
            a.np = std::stoi(v);
        } else if (k == "damage") {
            if (v != "truncate" && v != "flip" && v != "manifest") fail("--attempt '" + spec + "': damage " + v);
            a.damage = v;
        } else if (k == "kill" && v == "random") {
            a.random = true;
        } else if (k == "kill" || k == "term") {
            a.term = k == "term";
            const auto slash = v.rfind('/');
            if (slash == std::string::npos) fail("--attempt '" + spec + "': " + k + "=" + v + " is not METHOD/ROUND");
            a.method = v.substr(0, slash);
            a.round = std::stoi(v.substr(slash + 1));
        } else {
            fail("--attempt '" + spec + "': unknown key " + k);
        }
    }
    if (!a.random && a.method.empty()) fail("--attempt '" + spec + "': no kill= or term=");
    if (!a.damage.empty() && a.method.empty()) fail("--attempt '" + spec + "': damage needs kill=METHOD/ROUND");
    return a;
}

/// Starts `argv` with stdout and stderr to `log`; returns the pid.
pid_t start(const std::vector<std::string>& argv, const fs::path& log) {
    const pid_t pid = ::fork();
    if (pid < 0) fail("fork failed");
    if (pid == 0) {
        const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            ::dup2(fd, 1);
            ::dup2(fd, 2);
            ::close(fd);
        }
        std::vector<char*> args;
        for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        ::execvp(args[0], args.data());
        std::_Exit(127);
    }
    return pid;
}

/// Parent pid and command name of a process, from /proc/<pid>/stat.
bool proc_stat(pid_t pid, pid_t& ppid, std::string& comm) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
    std::string s;
    if (!std::getline(in, s)) return false;
    const auto open = s.find('('), close = s.rfind(')');
    if (open == std::string::npos || close == std::string::npos) return false;
    comm = s.substr(open + 1, close - open - 1);
    std::istringstream rest(s.substr(close + 2));
    char state;
    rest >> state >> ppid;
    return true;
}

/// `root` and every process descending from it.
std::vector<pid_t> tree(pid_t root) {
    std::vector<std::pair<pid_t, pid_t>> all;  // (pid, ppid)
    for (const auto& e : fs::directory_iterator("/proc")) {
        const std::string n = e.path().filename().string();
        if (n.empty() || n.find_first_not_of("0123456789") != std::string::npos) continue;
        pid_t ppid = 0;
        std::string comm;
        if (proc_stat(std::stoi(n), ppid, comm)) all.emplace_back(std::stoi(n), ppid);
    }
    std::vector<pid_t> out{root};
    for (std::size_t k = 0; k < out.size(); ++k)
        for (const auto& [p, pp] : all)
            if (pp == out[k]) out.push_back(p);
    return out;
}

/// Exit status of `pid` if it ended (reaped), else nullopt.
std::optional<int> finished(pid_t pid) {
    int status = 0;
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    return std::nullopt;
}

std::string slurp(const fs::path& p);

/// Waits for `pid`; after `limit` seconds kills its process tree and fails (a rank left waiting in a
/// collective would otherwise hang the test until ctest's timeout).
int wait_for(pid_t pid, double limit, const fs::path& log) {
    const auto begun = std::chrono::steady_clock::now();
    for (;;) {
        if (const auto status = finished(pid)) return *status;
        if (std::chrono::duration<double>(std::chrono::steady_clock::now() - begun).count() > limit) {
            for (pid_t p : tree(pid)) ::kill(p, SIGKILL);
            fail("'" + log.string() + "' did not end in " + std::to_string(int(limit)) + " s:\n" + slurp(log));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
}

std::string slurp(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), {}};
}

/// The generation folders of a method, newest last.
std::vector<fs::path> generations(const fs::path& dir) {
    std::vector<fs::path> out;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir, ec))
        if (e.path().filename().string().rfind("round-", 0) == 0) out.push_back(e.path());
    std::sort(out.begin(), out.end());
    return out;
}

void damage(const fs::path& method_dir, const std::string& how, std::FILE* report) {
    const auto gens = generations(method_dir);
    if (gens.size() < 2) fail("damage: " + method_dir.string() + " has " + std::to_string(gens.size()) +
                              " generations, need 2 (one to damage, one to fall back to)");
    const fs::path g = gens.back();
    fs::path victim;
    if (how == "truncate") {
        victim = g / "user-1.safetensors";
        fs::resize_file(victim, fs::file_size(victim) / 2);
    } else if (how == "flip") {
        victim = g / "server.safetensors";
        std::string s = slurp(victim);
        s[s.size() / 2] ^= 0x40;
        std::ofstream(victim, std::ios::binary | std::ios::trunc) << s;
    } else {
        victim = g / "manifest.json";
        fs::resize_file(victim, fs::file_size(victim) / 3);
    }
    std::fprintf(report, "  damaged (%s) %s\n", how.c_str(), victim.c_str());
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"comigs-kill-resume: kill the demo at chosen and random points, resume, compare with an uninterrupted run"};
    fs::path dir;
    std::string demo, demo_mpi, compare, mpiexec, np_flag = "-n";
    std::vector<std::string> mpiexec_flags, attempt_specs, demo_flags;
    int final_np = 0;
    unsigned seed = 1;
    app.add_option("--dir", dir, "work folder (emptied first)")->required();
    app.add_option("--demo", demo, "comigs-demo (the reference, in-process attempts)")->required();
    app.add_option("--demo-mpi", demo_mpi, "comigs-demo-mpi (attempts with np=N)");
    app.add_option("--compare", compare, "comigs-compare-results")->required();
    app.add_option("--mpiexec", mpiexec, "MPI launcher");
    app.add_option("--np-flag", np_flag, "the launcher's flag for the number of ranks")->capture_default_str();
    app.add_option("--mpiexec-flag", mpiexec_flags, "extra launcher flags (repeatable)")->allow_extra_args(false);
    app.add_option("--attempt", attempt_specs, "an interrupted start (see the file comment; repeatable)")->required();
    app.add_option("--final-np", final_np, "ranks of the final start (0: in process)")->capture_default_str();
    app.add_option("--seed", seed, "seed of the random kill delays")->capture_default_str();
    // The demo's flags follow "--" and are taken off before CLI11 sees them.
    int ours = argc;
    for (int i = 1; i < argc; ++i)
        if (std::string(argv[i]) == "--") {
            ours = i;
            break;
        }
    for (int i = ours + 1; i < argc; ++i) demo_flags.emplace_back(argv[i]);
    CLI11_PARSE(app, ours, argv);

    std::vector<Attempt> attempts;
    for (const auto& s : attempt_specs) attempts.push_back(parse_attempt(s));
    std::error_code ec;
    fs::remove_all(dir, ec);
    fs::create_directories(dir);
    const fs::path ckpt = dir / "checkpoints";
    std::mt19937 rng(seed);
    // Open MPI's session folders and shared-memory segments of killed jobs stay behind (8 MB each):
    // keep them in a folder of this run, removed at the end. (A short path: PMIx puts sockets there.)
    fs::path mpi_tmp;
    if (!mpiexec.empty()) {
        mpi_tmp = fs::temp_directory_path() / ("comigs-kill-resume-" + std::to_string(::getpid()));
        fs::create_directories(mpi_tmp);
        ::setenv("OMPI_MCA_orte_tmpdir_base", mpi_tmp.c_str(), 1);
        ::setenv("OMPI_MCA_btl_vader_backing_directory", mpi_tmp.c_str(), 1);
    }

    auto command = [&](int np, const fs::path& out, bool checkpoint, bool resume) {
        std::vector<std::string> argv;
        if (np > 0) {
            if (mpiexec.empty() || demo_mpi.empty()) fail("np=" + std::to_string(np) + " needs --mpiexec and --demo-mpi");
            argv = {mpiexec, np_flag, std::to_string(np)};
            argv.insert(argv.end(), mpiexec_flags.begin(), mpiexec_flags.end());
            argv.push_back(demo_mpi);
        } else {
            argv.push_back(demo);
        }
        argv.insert(argv.end(), demo_flags.begin(), demo_flags.end());
        argv.insert(argv.end(), {"--out", out.string(), "--host-cache", (dir / "host.safetensors").string()});
        if (checkpoint) argv.insert(argv.end(), {"--checkpoint-dir", ckpt.string()});
        if (resume) argv.push_back("--resume");
        return argv;
    };
    auto describe = [](int status) {
        if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
        if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
        return std::string("status ") + std::to_string(status);
    };

    // The uninterrupted run (it also pretrains the host the others reuse).
    const auto t0 = std::chrono::steady_clock::now();
    {
        const pid_t pid = start(command(0, dir / "reference", false, false), dir / "reference.log");
        const int status = wait_for(pid, 180, dir / "reference.log");
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail("the reference run: " + describe(status) + "\n" + slurp(dir / "reference.log"));
    }
    const double reference_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("reference run: %.2f s\n", reference_seconds);

    bool resumed_somewhere = false;
    // After a damage, the starts that follow must report it unusable (one killed early may not get
    // that far; the final one must).
    bool expect_fallback = false;
    auto check_log = [&](const fs::path& log, bool last) {
        const std::string text = slurp(log);
        if (text.find("resumed from") != std::string::npos) resumed_somewhere = true;
        if (text.find("is unusable") != std::string::npos) expect_fallback = false;
        if (last && expect_fallback) fail("the damaged generation was not reported (" + log.string() + "):\n" + text);
        std::istringstream lines(text);
        for (std::string line; std::getline(lines, line);)
            if (line.rfind("checkpoint:", 0) == 0 || line.find("stopped after") != std::string::npos)
                std::printf("    %s\n", line.c_str());
    };

    for (std::size_t k = 0; k < attempts.size(); ++k) {
        const Attempt& a = attempts[k];
        const fs::path log = dir / ("attempt-" + std::to_string(k) + ".log");
        std::printf("attempt %zu (%s, %s):\n", k, a.text.c_str(), a.np > 0 ? ("np " + std::to_string(a.np)).c_str() : "in process");
        const auto since = fs::file_time_type::clock::now();  // generations written by this start
        const pid_t pid = start(command(a.np, dir / "resumed", true, k > 0), log);
        const auto begun = std::chrono::steady_clock::now();
        std::optional<int> status;
        const double delay = std::uniform_real_distribution<double>(0.0, reference_seconds)(rng);
        char gen[32];
        std::snprintf(gen, sizeof gen, "round-%06d", a.round);
        const fs::path target = ckpt / a.method / gen;
        bool signalled = false;
        while (!(status = finished(pid))) {
            const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - begun).count();
            if (t > 180) {
                for (pid_t p : tree(pid)) ::kill(p, SIGKILL);
                fail("attempt " + std::to_string(k) + " did not end in 3 minutes:\n" + slurp(log));
            }
            const auto written = fs::last_write_time(target / "manifest.json", ec);
            const bool due = a.random ? t >= delay : !ec && written >= since;
            if (due && !signalled) {
                if (a.term) {
                    for (pid_t p : tree(pid)) {  // the demo's processes (every rank), not the launcher
                        pid_t pp = 0;
                        std::string comm;
                        if (proc_stat(p, pp, comm) && comm.rfind("comigs-demo", 0) == 0 && ::kill(p, SIGTERM) == 0)
                            signalled = true;
                    }
                    if (signalled) std::printf("  SIGTERM when %s appeared\n", target.c_str());
                } else {
                    signalled = true;
                    // Every process at once, repeated until none is left (a launcher may still be forking).
                    for (int round = 0; round < 20; ++round) {
                        const auto ps = tree(pid);
                        for (pid_t p : ps) ::kill(p, SIGKILL);
                        if (ps.size() == 1) break;
                    }
                    if (a.random) std::printf("  SIGKILL after %.3f s\n", t);
                    else std::printf("  SIGKILL when %s appeared\n", target.c_str());
                }
            }
            std::this_thread::sleep_for(std::chrono::microseconds(500));
        }
        std::printf("  ended: %s\n", describe(*status).c_str());
        check_log(log, false);
        if (!signalled) {
            if (!a.random) fail("attempt " + std::to_string(k) + " finished before " + target.string() + " appeared");
            std::printf("  (finished before the random kill)\n");
        }
        if (a.term && signalled) {
            const std::string text = slurp(log);
            if (text.find("stopped after round") == std::string::npos)
                fail("attempt " + std::to_string(k) + ": SIGTERM did not stop the run with a checkpoint:\n" + text);
            if (a.np == 0 && !(WIFEXITED(*status) && WEXITSTATUS(*status) == 128 + SIGTERM))
                fail("attempt " + std::to_string(k) + ": exit status " + describe(*status) + ", expected 143");
        }
        if (!a.damage.empty()) {
            if (expect_fallback) fail("attempt " + std::to_string(k) + ": the previous damage was never reported");
            damage(ckpt / a.method, a.damage, stdout);
            expect_fallback = true;
        }
    }

    std::printf("final start (%s):\n", final_np > 0 ? ("np " + std::to_string(final_np)).c_str() : "in process");
    {
        const fs::path log = dir / "final.log";
        const pid_t pid = start(command(final_np, dir / "resumed", true, true), log);
        const int status = wait_for(pid, 180, log);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail("the final run: " + describe(status) + "\n" + slurp(log));
        check_log(log, true);
    }
    if (!resumed_somewhere) fail("no start resumed from a generation: the kills came too early or too late");

    {
        const pid_t pid = start({compare, (dir / "reference/results.json").string(), (dir / "resumed/results.json").string(),
                                 "--ignore", "seconds", "--ignore", "reused"},
                                dir / "compare.log");
        const int status = wait_for(pid, 60, dir / "compare.log");
        std::printf("results.json: %s", slurp(dir / "compare.log").c_str());
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail("results.json differs from the uninterrupted run's");
    }
    for (const char* f : {"curves.svg", "routing.html"})
        if (slurp(dir / "reference" / f) != slurp(dir / "resumed" / f))
            fail(std::string(f) + " differs from the uninterrupted run's");
    std::printf("curves.svg and routing.html: byte for byte the same\nPASSED\n");
    if (!mpi_tmp.empty()) fs::remove_all(mpi_tmp, ec);
    return 0;
}
