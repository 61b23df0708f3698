package funcatron;

import java.io.BufferedOutputStream;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.EOFException;
import java.io.PrintWriter;
import java.io.StringWriter;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.lang.reflect.Modifier;
import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.channels.Channels;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * Funcatron's Java worker: resolves every operationId to a method once, then
 * serves invocations from its Runner over a Unix socket (frame format:
 * runner/src/worker/frame.rs). An operationId names `package.Class` (method
 * `handle`) or `package.Class::method`; the method takes a {@link Request}
 * and returns a Response, String, byte[], null, or a value {@link Json}
 * encodes. Static or instance methods (public no-argument constructor).
 */
public final class Worker {
    private static final class Target {
        final Object self;
        final Method method;
        Target(Object self, Method method) { this.self = self; this.method = method; }
    }

    private static Target resolve(String op) throws Exception {
        String cls = op, name = "handle";
        int sep = op.indexOf("::");
        if (sep >= 0) { cls = op.substring(0, sep); name = op.substring(sep + 2); }
        Class<?> c;
        try {
            c = Class.forName(cls);
        } catch (ClassNotFoundException e) {
            throw new IllegalArgumentException("operationId " + op + ": no class " + cls);
        }
        Method m;
        try {
            m = c.getMethod(name, Request.class);
        } catch (NoSuchMethodException e) {
            throw new IllegalArgumentException("operationId " + op + ": " + cls + " has no public method " + name + "(funcatron.Request)");
        }
        Object self = Modifier.isStatic(m.getModifiers()) ? null : c.getConstructor().newInstance();
        return new Target(self, m);
    }

    private static byte[] b(String s) { return s.getBytes(StandardCharsets.UTF_8); }

    static List<byte[]> frameOf(Object v) {
        int status = 200;
        Map<String, String> headers = new HashMap<>();
        Object body = v;
        if (v instanceof Response) {
            Response r = (Response) v;
            status = r.status; headers.putAll(r.headers); body = r.body;
        } else if (v == null) {
            status = 204;
        }
        if (status < 100 || status > 599) throw new IllegalArgumentException("invalid HTTP status " + status);
        byte[] data;
        if (body == null) data = new byte[0];
        else if (body instanceof byte[]) { data = (byte[]) body; headers.putIfAbsent("content-type", "application/octet-stream"); }
        else if (body instanceof String) { data = b((String) body); headers.putIfAbsent("content-type", "text/plain; charset=utf-8"); }
        else { data = b(Json.encode(body)); headers.putIfAbsent("content-type", "application/json"); }
        List<byte[]> out = new ArrayList<>();
        out.add(b("ok")); out.add(b(Integer.toString(status))); out.add(data);
        for (Map.Entry<String, String> e : headers.entrySet()) { out.add(b(e.getKey().toLowerCase())); out.add(b(e.getValue())); }
        return out;
    }

    static void send(DataOutputStream out, List<byte[]> items) throws Exception {
        out.writeInt(items.size());
        for (byte[] it : items) { out.writeInt(it.length); out.write(it); }
        out.flush();
    }

    static List<byte[]> read(DataInputStream in) throws Exception {
        int count;
        try { count = in.readInt(); } catch (EOFException e) { return null; }
        List<byte[]> items = new ArrayList<>(count);
        for (int k = 0; k < count; k++) {
            byte[] it = new byte[in.readInt()];
            in.readFully(it);
            items.add(it);
        }
        return items;
    }

    public static void main(String[] args) throws Exception {
        SocketChannel ch = SocketChannel.open(StandardProtocolFamily.UNIX);
        ch.connect(UnixDomainSocketAddress.of(System.getenv("FUNCATRON_SOCKET")));
        DataInputStream in = new DataInputStream(Channels.newInputStream(ch));
        DataOutputStream out = new DataOutputStream(new BufferedOutputStream(Channels.newOutputStream(ch), 65536));
        Map<String, Target> targets = new HashMap<>();
        Store store = new Store(in, out);
        try {
            String ops = System.getenv().getOrDefault("FUNCATRON_OPERATIONS", "");
            for (String op : ops.split(",")) if (!op.isEmpty()) targets.put(op, resolve(op));
        } catch (Throwable t) {
            send(out, List.of(b("error"), b("loading the bundle failed: " + t)));
            System.exit(1);
        }
        send(out, List.of(b("ready")));
        for (;;) {
            List<byte[]> items = read(in);
            if (items == null) return;
            List<byte[]> frame;
            try {
                Request req = new Request(items, store);
                Target t = targets.get(req.operation);
                frame = frameOf(t.method.invoke(t.self, req));
            } catch (Throwable t) {
                Throwable cause = t instanceof InvocationTargetException ? t.getCause() : t;
                StringWriter sw = new StringWriter();
                cause.printStackTrace(new PrintWriter(sw));
                System.err.println("request " + new String(items.get(1), StandardCharsets.UTF_8) + ": " + sw);
                frame = List.of(b("error"), b(String.valueOf(cause)));
            }
            send(out, frame);
        }
    }
}
